// Overview: head, appends per second, topics, groups and dead letters, refreshed every two
// seconds while the tab is visible (polling stops while it is hidden).
import { api, chrome, clear, el, fmtAgo, fmtDuration, fmtNum, fmtRate, num, poll, refreshInfo, sparkline, table, $ } from "./lib.js";

const SAMPLES = 60;
const heads = []; // {t, head}
const lagHistory = new Map(); // group -> recent lags

function rates() {
  const out = [];
  for (let i = 1; i < heads.length; i++) {
    const dt = (heads[i].t - heads[i - 1].t) / 1000;
    out.push(dt > 0 ? Math.max(0, heads[i].head - heads[i - 1].head) / dt : 0);
  }
  return out;
}

function card(label, value, extra, id) {
  return el("div", { class: "card", id }, el("div", { class: "card-label" }, label), el("div", { class: "card-value" }, value), extra);
}

function growing(group, lag) {
  const seen = lagHistory.get(group) || [];
  seen.push(lag);
  while (seen.length > 4) seen.shift();
  lagHistory.set(group, seen);
  // growing: it rose over the last readings and never fell
  if (seen.length < 3) return false;
  for (let i = 1; i < seen.length; i++) if (seen[i] < seen[i - 1]) return false;
  return seen[seen.length - 1] > seen[0];
}

async function refresh() {
  const [info, topics, groups] = await Promise.all([refreshInfo(), api("topics", { params: { limit: 1000 } }), api("groups", { params: { limit: 1000 } })]);
  if (!info) return;
  heads.push({ t: Date.now(), head: info.head });
  while (heads.length > SAMPLES + 1) heads.shift();
  const r = rates();
  const now = topics.now_ms;
  clear($("#cards")).append(
    card("Head offset", fmtNum(info.head), null, "card-head"),
    card("Appends/s", r.length ? fmtRate(r[r.length - 1]) : "…", sparkline(r, { label: "appends per second, last two minutes" }), "card-rate"),
    card("Topics", fmtNum(topics.topics.length)),
    card("Groups", fmtNum(groups.groups.length)),
    el("a", { href: "/dead-letters", class: "card-link" },
      card("Dead letters", fmtNum(info.dead_letters.pending), el("div", { class: "muted" }, `${fmtNum(info.dead_letters.requeued)} requeued`), "card-dead")),
  );
  $("#card-dead").classList.toggle("alert", info.dead_letters.pending > 0);
  clear($("#topics")).append(table(
    ["Topic", { label: "Partitions", num: true }, { label: "Events", num: true }, { label: "Last offset", num: true }, "Last append", { label: "Rate (1 min)", num: true }],
    topics.topics.map((t) => el("tr", { dataset: { topic: t.name } },
      el("td", {}, el("a", { href: `/topics/${encodeURIComponent(t.name)}` }, t.name)),
      num(fmtNum(t.partitions)), num(fmtNum(t.events)), num(fmtNum(t.last_offset)),
      el("td", {}, t.last_append_ms ? fmtAgo(t.last_append_ms, now) : "never"),
      num((t.rate_exact ? "" : "~") + fmtRate(t.rate_per_s)))),
    { empty: "no topics yet: append an event, or run eventlog topics create" }));
  clear($("#groups")).append(table(
    ["Group", { label: "Live members", num: true }, { label: "Partitions", num: true }, { label: "Lag", num: true }, { label: "Lag time", num: true }, { label: "Dead letters", num: true }],
    groups.groups.map((g) => {
      const up = growing(g.group, g.lag);
      return el("tr", { class: up ? "growing" : "", dataset: { group: g.group } },
        el("td", {}, el("a", { href: `/groups/${encodeURIComponent(g.group)}` }, g.group)),
        num(fmtNum(g.live_members), { class: g.live_members ? "num" : "num muted" }),
        num(fmtNum(g.partitions)),
        num((g.lag_exact ? "" : "~") + fmtNum(g.lag) + (up ? " ▲" : ""), { class: up ? "num lag-up" : "num", title: up ? "lag is growing" : null }),
        num(g.lag ? fmtDuration(g.lag_ms) : "–"),
        num(fmtNum(g.dead_letters), { class: g.dead_letters ? "num alert-text" : "num" }));
    }),
    { empty: "no consumer groups yet" }));
}

// ?every=SECONDS sets the refresh period (default 2, at least 0.5)
const every = Math.max(0.5, Number(new URLSearchParams(location.search).get("every")) || 2);
await chrome("overview");
poll(refresh, every * 1000);
