// Dead letters: filter, select, requeue (back to their own group, attempts reset) or purge.
// Acting on a whole group asks for its name to be typed. Rows say whether an entry was
// requeued, and whether its event then failed again (re-failed). Payloads show as text.
import { api, chrome, clear, drawer, el, fmtAgo, fmtNum, fmtTime, kv, num, refreshInfo, showError, table, toast, $ } from "./lib.js";

const params = new URLSearchParams(location.search);
const selected = new Set();
let cursor = null;
let knownGroups = [];
let confirmAction = null;

if (params.get("group")) {
  // selected before the first load, so that load already filters by it
  $("#f-group").appendChild(el("option", { value: params.get("group") }, params.get("group")));
  $("#f-group").value = params.get("group");
}
$("#f-topic").value = params.get("topic") || "";
$("#f-q").value = params.get("q") || "";
$("#f-pending").checked = params.get("pending") === "1";

function filters() {
  return {
    group: $("#f-group").value, topic: $("#f-topic").value.trim(), error_type: $("#f-error").value,
    q: $("#f-q").value.trim(), pending: $("#f-pending").checked ? "true" : "",
  };
}

function status(d) {
  if (d.refailed) return el("span", { class: "pill bad", title: "requeued, then failed again: see the newer entry" }, "re-failed");
  if (d.requeued) return el("span", { class: "pill ok", title: `requeued ${fmtAgo(d.requeued_at_ms)}` }, "requeued");
  return el("span", { class: "pill warn" }, "pending");
}

function row(d) {
  const box = el("input", { type: "checkbox", "aria-label": `select ${d.id}`, class: "writes" });
  box.checked = selected.has(d.id);
  box.addEventListener("click", (e) => e.stopPropagation());
  box.addEventListener("change", () => {
    if (box.checked) selected.add(d.id);
    else selected.delete(d.id);
    updateButtons();
  });
  return el("tr", { dataset: { id: d.id, group: d.group }, onclick: () => openEntry(d.id), tabindex: 0 },
    el("td", { class: "writes" }, box),
    el("td", { class: "mono" }, d.id), el("td", {}, d.group), el("td", {}, `${d.topic}[${d.partition}]`),
    num(fmtNum(d.offset)), num(d.attempts),
    el("td", { class: "error-text" }, `${d.error_type}: ${(d.error_message || "").split("\n")[0]}`.slice(0, 120)),
    el("td", {}, fmtAgo(d.dead_lettered_at_ms)),
    el("td", {}, status(d)));
}

function updateButtons() {
  $("#requeue-selected").disabled = selected.size === 0;
  $("#purge-selected").disabled = selected.size === 0;
  $("#requeue-selected").textContent = selected.size ? `Requeue ${selected.size} selected` : "Requeue selected";
  $("#purge-selected").textContent = selected.size ? `Purge ${selected.size} selected` : "Purge selected";
}

function fillSelect(select, values, keep) {
  const current = keep ?? select.value;
  const first = select.querySelector("option[value='']");
  clear(select);
  if (first) select.appendChild(first);
  for (const v of values) select.appendChild(el("option", { value: v }, v));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

async function load(reset) {
  if (reset) {
    cursor = null;
    clear($("#list"));
  }
  let data;
  try {
    data = await api("dead-letters", { params: { ...filters(), cursor, limit: 100 } });
  } catch (exc) {
    showError(exc, $("#list"));
    return;
  }
  knownGroups = data.groups;
  fillSelect($("#f-group"), data.groups);
  fillSelect($("#f-error"), data.error_types);
  const torn = $("#torn");
  const problems = [];
  if (data.torn_tail) problems.push("the file ends in a torn line (a crash mid-write); it is skipped");
  if (data.unreadable_lines.length) problems.push(`unreadable lines ${data.unreadable_lines.join(", ")} are kept as they are (see eventlog doctor)`);
  torn.textContent = problems.join("; ");
  torn.hidden = !problems.length;
  $("#total").textContent = `${fmtNum(data.total)} match${data.total === 1 ? "" : "es"}`;
  let body = $("#list tbody");
  if (!body) {
    $("#list").append(table(["", "ID", "Group", "Topic", { label: "Offset", num: true }, { label: "Attempts", num: true }, "Error", "Dead-lettered", "Status"], [], { empty: "no dead letters" }));
    body = $("#list tbody");
    $("#list thead th").classList.add("writes");
  }
  if (data.dead_letters.length) {
    const empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
  }
  for (const d of data.dead_letters) body.appendChild(row(d));
  cursor = data.next_cursor;
  $("#more").hidden = cursor === null;
}

async function openEntry(id) {
  let d;
  try {
    d = await api(`dead-letters/${id}`);
  } catch (exc) {
    showError(exc);
    return;
  }
  drawer(`Dead letter ${d.id}`,
    kv([["group", d.group], ["event", `${d.topic}[${d.partition}] offset ${d.offset}`], ["key", d.key ?? "–"],
      ["event time", fmtTime(d.event_time_ms)], ["attempts", String(d.attempts)],
      ["first failure", fmtTime(d.first_failed_at_ms)], ["last failure", fmtTime(d.last_failed_at_ms)],
      ["dead-lettered", fmtTime(d.dead_lettered_at_ms)],
      ["requeued", d.requeued ? fmtTime(d.requeued_at_ms) + (d.refailed ? " — then failed again" : "") : "no"]]),
    el("h3", {}, "Error"),
    el("pre", { class: "error-text" }, `${d.error_type}: ${d.error_message}`),
    el("h3", {}, "Traceback"),
    el("pre", { class: "traceback" }, d.traceback || "(none recorded)"),
    el("h3", {}, "Headers"),
    Object.keys(d.headers || {}).length ? kv(Object.entries(d.headers)) : el("p", { class: "muted" }, "none"),
    el("h3", {}, "Payload"),
    el("pre", { class: "json" }, JSON.stringify(d.payload, null, 2)),
    el("div", { class: "row writes" },
      el("button", { type: "button", onclick: () => act("requeue", { ids: [d.id] }) }, "Requeue"),
      el("button", { type: "button", class: "danger", onclick: () => act("purge", { ids: [d.id] }) }, "Purge")));
}

async function act(verb, body) {
  try {
    const result = await api(`dead-letters/${verb}`, { method: "POST", body });
    toast(`${verb === "requeue" ? "requeued" : "purged"} ${fmtNum(result.count)} dead letter${result.count === 1 ? "" : "s"}`);
    selected.clear();
    updateButtons();
    await load(true);
    await refreshInfo();
    return true;
  } catch (exc) {
    showError(exc);
    return false;
  }
}

function openConfirm(verb) {
  const dialog = $("#confirm-dialog");
  confirmAction = verb;
  $("#confirm-title").textContent = verb === "requeue" ? "Requeue every dead letter of a group" : "Purge every dead letter of a group";
  $("#confirm-text").textContent = verb === "requeue"
    ? "They go back to their group, attempts reset; the group's consumers handle them again."
    : "They are deleted from the dead-letter file for good.";
  fillSelect($("#confirm-group"), knownGroups, $("#f-group").value);
  $("#confirm-input").value = "";
  $("#confirm-go").disabled = true;
  dialog.showModal();
}

await chrome("dead-letters");
$("#filters").addEventListener("submit", (e) => { e.preventDefault(); load(true); });
$("#more").addEventListener("click", () => load(false));
$("#requeue-selected").addEventListener("click", () => act("requeue", { ids: [...selected] }));
$("#purge-selected").addEventListener("click", () => {
  if (window.confirm(`Purge ${selected.size} dead letters for good?`)) act("purge", { ids: [...selected] });
});
$("#requeue-all").addEventListener("click", () => openConfirm("requeue"));
$("#purge-all").addEventListener("click", () => openConfirm("purge"));
$("#confirm-cancel").addEventListener("click", () => $("#confirm-dialog").close());
for (const id of ["#confirm-input", "#confirm-group"]) {
  $(id).addEventListener("input", () => {
    $("#confirm-go").disabled = !$("#confirm-group").value || $("#confirm-input").value !== $("#confirm-group").value;
  });
}
$("#confirm-go").addEventListener("click", async () => {
  const group = $("#confirm-group").value;
  const ok = await act(confirmAction, { group, confirm: $("#confirm-input").value });
  if (ok) $("#confirm-dialog").close();
});
await load(true);
