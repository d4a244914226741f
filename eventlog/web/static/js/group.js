// One consumer group: members (with heartbeat age), partitions (position, head, lag, lag
// time, batch in flight), events being retried, and the "Reset offsets" dialog: it shows the
// plan first, and Execute stays disabled while the group has live members (the server
// refuses then too, with 409).
import { api, chrome, clear, el, fmtAgo, fmtDuration, fmtNum, info, num, poll, showError, table, toast, $ } from "./lib.js";

const group = decodeURIComponent(location.pathname.slice("/groups/".length));
let liveMembers = 0;
let planned = null;

document.title = `${group} · eventlog`;
$("#title").textContent = group;
$("#reset-group").textContent = group;

async function refresh() {
  let g;
  try {
    g = await api(`groups/${encodeURIComponent(group)}`);
  } catch (exc) {
    showError(exc, $("#members"));
    return;
  }
  liveMembers = g.live_members;
  $("#summary").textContent = `${fmtNum(g.live_members)} live member${g.live_members === 1 ? "" : "s"}, lag ${g.lag_exact ? "" : "~"}${fmtNum(g.lag)}${g.lag ? ` (oldest waiting ${fmtDuration(g.lag_ms)})` : ""}`;
  clear($("#members")).append(table(
    ["Member", { label: "PID", num: true }, "Host", "Partitions", "Heartbeat", ""],
    g.members.map((m) => el("tr", { class: m.stale ? "stale" : "" },
      el("td", { class: "mono" }, m.member), num(m.pid ?? "–"), el("td", {}, m.host ?? "–"),
      el("td", {}, m.partitions.map(([t, p]) => `${t}[${p}]`).join(" ") || "–"),
      el("td", {}, m.heartbeat_age_s === null ? "never" : `${fmtDuration(m.heartbeat_age_s * 1000)} ago`),
      el("td", { class: "alert-text" }, m.stale ? "stale heartbeat: the process may be stuck" : ""))),
    { empty: "none running" }));
  clear($("#partitions")).append(table(
    ["Topic", { label: "Partition", num: true }, { label: "Committed", num: true }, { label: "Head", num: true }, { label: "Lag", num: true }, { label: "Lag time", num: true }, "In flight", "Updated"],
    g.partitions.map((p) => el("tr", {},
      el("td", {}, el("a", { href: `/topics/${encodeURIComponent(p.topic)}` }, p.topic)),
      num(p.partition), num(fmtNum(p.position)), num(fmtNum(p.head)),
      num((p.lag_exact ? "" : "~") + fmtNum(p.lag), { class: p.lag ? "num lag" : "num" }),
      num(p.lag ? fmtDuration(p.lag_ms) : "–"),
      el("td", {}, p.in_flight ? `${p.in_flight[0]}–${p.in_flight[1]}` : "–"),
      el("td", {}, fmtAgo(p.updated_at_ms, g.now_ms)))),
    { empty: "no positions yet" }));
  clear($("#retrying")).append(table(
    [{ label: "Offset", num: true }, "Partition", { label: "Attempts", num: true }, "Last failure", "Error"],
    g.retrying.map((r) => el("tr", {},
      num(r.offset), el("td", {}, `${r.topic}[${r.partition}]`), num(r.attempts),
      el("td", {}, fmtAgo(r.last_failed_at_ms, g.now_ms)),
      el("td", { class: "error-text" }, `${r.error_type ?? ""}: ${r.error_message ?? ""}`))),
    { empty: "nothing being retried" }));
  clear($("#extras")).append(
    `${fmtNum(g.requeued_waiting)} requeued dead letters waiting · `,
    el("a", { href: `/dead-letters?group=${encodeURIComponent(group)}` }, `${fmtNum(g.dead_letters)} dead letters`));
  updateExecute();
}

function updateExecute() {
  const button = $("#r-execute");
  const ro = info() && info().read_only;
  button.disabled = ro || !planned || liveMembers > 0 || (planned && planned.live_members.length > 0);
  button.title = liveMembers > 0 ? "stop the group's consumers first" : "";
}

function specBody(execute) {
  const spec = $("#r-spec").value;
  const body = { spec, execute };
  const raw = $("#r-value").value.trim();
  if (spec === "offset" || spec === "shift") {
    if (!/^-?\d+$/.test(raw)) throw new Error(`${spec} needs a whole number`);
    body.value = Number(raw);
  } else if (spec === "datetime" || spec === "duration") {
    if (!raw) throw new Error(`${spec} needs a value`);
    body.value = raw;
  }
  const topics = $("#r-topics").value.split(/\s+/).filter(Boolean);
  if (topics.length) body.topics = topics;
  return body;
}

function showPlan(plan) {
  const box = clear($("#reset-plan"));
  const state = plan.executed ? "applied" : "plan: nothing changed yet";
  box.append(el("p", {}, `${plan.spec} (${state}): ${fmtNum(plan.redelivered)} events ${plan.executed ? "will be" : "would be"} redelivered, ${fmtNum(plan.skipped)} skipped.`));
  box.append(table(
    ["Topic", { label: "Partition", num: true }, { label: "Before", num: true }, { label: "After", num: true }, { label: "Redeliver", num: true }, { label: "Skip", num: true }, { label: "Lag after", num: true }],
    plan.partitions.map((p) => el("tr", {}, el("td", {}, p.topic), num(p.partition), num(p.before ?? "–"), num(p.after ?? "–"), num(fmtNum(p.redelivered)), num(fmtNum(p.skipped)), num(fmtNum(p.lag_after))))));
  if (plan.live_members.length) {
    box.append(el("p", { class: "warning", id: "reset-live" }, `The group has live members (pids ${plan.live_members.join(", ")}): stop them before executing.`));
  }
}

async function requestPlan(execute) {
  const errorBox = $("#reset-error");
  errorBox.hidden = true;
  let body;
  try {
    body = specBody(execute);
  } catch (exc) {
    showError({ message: exc.message }, errorBox);
    return;
  }
  try {
    const plan = await api(`groups/${encodeURIComponent(group)}/reset`, { method: "POST", body });
    planned = execute ? null : plan;
    if (!execute) liveMembers = plan.live_members.length;
    showPlan(plan);
    if (execute) {
      toast(`positions of ${group} reset`);
      refresh();
    }
  } catch (exc) {
    planned = null;
    showError(exc, errorBox);
  }
  updateExecute();
}

await chrome("groups");
const dialog = $("#reset-dialog");
$("#reset-open").addEventListener("click", () => {
  planned = null;
  clear($("#reset-plan"));
  $("#reset-error").hidden = true;
  updateExecute();
  dialog.showModal();
});
$("#r-cancel").addEventListener("click", () => dialog.close());
$("#r-spec").addEventListener("change", () => {
  const needs = ["offset", "shift", "datetime", "duration"].includes($("#r-spec").value);
  $("#r-value-label").hidden = !needs;
  planned = null;
  updateExecute();
});
for (const id of ["#r-value", "#r-topics"]) {
  $(id).addEventListener("input", () => { planned = null; updateExecute(); });
}
$("#r-plan").addEventListener("click", () => requestPlan(false));
$("#r-execute").addEventListener("click", () => requestPlan(true));
poll(refresh, 2000);
