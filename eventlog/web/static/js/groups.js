// Consumer groups: live members, lag and lag time (red while growing), dead letters.
import { api, chrome, clear, el, fmtDuration, fmtNum, num, poll, table, $ } from "./lib.js";

const history = new Map();

function growing(group, lag) {
  const seen = history.get(group) || [];
  seen.push(lag);
  while (seen.length > 4) seen.shift();
  history.set(group, seen);
  if (seen.length < 3) return false;
  for (let i = 1; i < seen.length; i++) if (seen[i] < seen[i - 1]) return false;
  return seen[seen.length - 1] > seen[0];
}

async function refresh() {
  const data = await api("groups", { params: { limit: 1000 } });
  clear($("#groups")).append(table(
    ["Group", { label: "Live members", num: true }, { label: "Stale", num: true }, { label: "Partitions", num: true }, { label: "Lag", num: true }, { label: "Lag time", num: true }, { label: "Dead letters", num: true }],
    data.groups.map((g) => {
      const up = growing(g.group, g.lag);
      return el("tr", { class: up ? "growing" : "", dataset: { group: g.group } },
        el("td", {}, el("a", { href: `/groups/${encodeURIComponent(g.group)}` }, g.group)),
        num(fmtNum(g.live_members)),
        num(g.stale_members ? fmtNum(g.stale_members) : "–", { class: g.stale_members ? "num alert-text" : "num" }),
        num(fmtNum(g.partitions)),
        num((g.lag_exact ? "" : "~") + fmtNum(g.lag) + (up ? " ▲" : ""), { class: up ? "num lag-up" : "num" }),
        num(g.lag ? fmtDuration(g.lag_ms) : "–"),
        num(fmtNum(g.dead_letters), { class: g.dead_letters ? "num alert-text" : "num" }));
    }),
    { empty: "no consumer groups yet" }));
}

await chrome("groups");
poll(refresh, 2000);
