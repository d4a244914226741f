// A topic (or pattern): browse newest first with filters, open an event in a drawer, follow
// it live, append to it. Payloads are shown as text only.
import { api, chrome, clear, copy, drawer, el, fmtAgo, fmtNum, fmtTime, info, kv, num, preview, shellQuote, showError, toast, $ } from "./lib.js";
import { LiveStream } from "./live.js";

const MAX_ROWS = 1000;
const pattern = decodeURIComponent(location.pathname.slice("/topics/".length));
const isPattern = pattern.includes("*") || pattern.includes("#");
const rows = $("#rows");
const params = new URLSearchParams(location.search);
const filters = { key: params.get("key") || "", q: params.get("q") || "", since: params.get("since") || "", until: params.get("until") || "" };
let cursor = null;
let live = null;
let paused = false;
let buffered = [];

document.title = `${pattern} · eventlog`;
$("#title").textContent = pattern;
$("#f-key").value = filters.key;
$("#f-q").value = filters.q;
$("#f-since").value = filters.since;
$("#f-until").value = filters.until;

function row(e) {
  return el("tr", { dataset: { offset: e.offset, ts: e.timestamp_ms }, tabindex: 0, onclick: () => openEvent(e.offset), onkeydown: (k) => { if (k.key === "Enter") openEvent(e.offset); } },
    num(e.offset),
    el("td", { class: "time" }, fmtTime(e.timestamp_ms)),
    el("td", {}, e.topic),
    num(e.partition),
    el("td", { class: "key" }, e.key ?? "–"),
    el("td", { class: "payload" }, e.payload_omitted ? `(${fmtNum(e.payload_chars)} characters of JSON: open the event)` : preview(e.payload)));
}

function dropPlaceholder() {
  const empty = rows.querySelector("tr.empty");
  if (empty) empty.remove();
}

function placeholder(text) {
  if (!rows.children.length) rows.appendChild(el("tr", { class: "empty" }, el("td", { colspan: 6 }, text)));
}

function trim() {
  while (rows.children.length > MAX_ROWS) rows.lastElementChild.remove();
}

function newestShown() {
  const first = rows.querySelector("tr[data-offset]");
  return first ? Number(first.dataset.offset) : null;
}

async function loadPage(reset) {
  if (reset) {
    clear(rows);
    cursor = null;
  }
  const older = $("#older");
  older.disabled = true;
  try {
    const page = await api(`topics/${encodeURIComponent(pattern)}/events`, { params: { ...filters, cursor, limit: 50 } });
    dropPlaceholder();
    for (const e of page.events) rows.appendChild(row(e));
    trim();
    cursor = page.next_cursor;
    older.hidden = cursor === null;
    $("#scan-note").textContent = page.scan_limited
      ? `searched ${fmtNum(page.scanned)} events, down to offset ${fmtNum(page.scanned_to)}; load older to search on`
      : "";
    placeholder(filters.key || filters.q || filters.since || filters.until ? "no events match" : "no events yet");
  } catch (exc) {
    showError(exc);
  } finally {
    older.disabled = false;
  }
}

function matchesFilters(e) {
  if (filters.key && e.key !== filters.key) return false;
  if (filters.q) {
    const needle = filters.q.toLowerCase();
    const hay = [JSON.stringify(e.payload), e.key || "", JSON.stringify(e.headers)].join("\n").toLowerCase();
    if (!hay.includes(needle)) return false;
  }
  return true;
}

function addLive(e) {
  if (!matchesFilters(e)) return;
  if (paused) {
    buffered.push(e);
    if (buffered.length > MAX_ROWS) buffered.shift();
    $("#live-note").textContent = `${fmtNum(buffered.length)} new while paused`;
    return;
  }
  dropPlaceholder();
  rows.prepend(row(e));
  trim();
}

function setState(state) {
  const pill = $("#live-state");
  const shown = paused && state === "live" ? "paused" : state;
  pill.textContent = shown;
  pill.dataset.state = shown;
  pill.className = `pill ${{ live: "ok", paused: "warn", reconnecting: "warn", connecting: "warn", closed: "bad" }[shown] || ""}`;
}

async function startLive() {
  let after = newestShown();
  if (after === null) after = (await api("info")).head;
  paused = false;
  buffered = [];
  live = new LiveStream({
    topics: [pattern], after,
    onEvent: addLive,
    onState: setState,
    onGap: (gap) => {
      const notice = $("#notice");
      notice.className = "warning";
      notice.textContent = gap.first_available > gap.after
        ? `Events after offset ${fmtNum(gap.after)} were pruned before this page read them; the stream goes on from offset ${fmtNum(gap.first_available)}.`
        : `Offset ${fmtNum(gap.after)} is past this log's head (it was restored or made anew); the stream goes on from offset ${fmtNum(gap.first_available)}: reload to see the events before it.`;
      notice.hidden = false;
    },
  });
  $("#live-toggle").hidden = true;
  $("#live-pause").hidden = false;
  $("#live-pause").textContent = "Pause";
  $("#live-stop").hidden = false;
}

function stopLive() {
  if (live) live.stop();
  live = null;
  paused = false;
  $("#live-toggle").hidden = false;
  $("#live-pause").hidden = true;
  $("#live-stop").hidden = true;
  $("#live-note").textContent = buffered.length ? `${fmtNum(buffered.length)} events not shown: reload to see them` : "";
  buffered = [];
}

function togglePause() {
  paused = !paused;
  $("#live-pause").textContent = paused ? "Resume" : "Pause";
  if (!paused) {
    dropPlaceholder();
    for (const e of buffered) rows.prepend(row(e));
    buffered = [];
    trim();
    $("#live-note").textContent = "";
  }
  setState(live && live.source ? "live" : $("#live-state").dataset.state);
}

function cliCommand(e) {
  const parts = ["eventlog", "--db", shellQuote(info().db), "append", shellQuote(e.topic), shellQuote(JSON.stringify(e.payload))];
  if (e.key !== null) parts.push("--key", shellQuote(e.key));
  for (const [name, value] of Object.entries(e.headers || {})) parts.push("--header", shellQuote(`${name}=${value}`));
  return parts.join(" ");
}

async function openEvent(offset) {
  let e;
  try {
    e = await api(`events/${offset}`);
  } catch (exc) {
    showError(exc);
    return;
  }
  const headers = Object.entries(e.headers || {});
  drawer(`Event ${fmtNum(e.offset)}`,
    kv([["offset", String(e.offset)], ["topic", e.topic], ["partition", String(e.partition)], ["key", e.key ?? "–"],
      ["time", `${fmtTime(e.timestamp_ms)} (${fmtAgo(e.timestamp_ms)})`]]),
    el("h3", {}, "Headers"),
    headers.length ? kv(headers) : el("p", { class: "muted" }, "none"),
    el("h3", {}, "Payload"),
    el("pre", { class: "json" }, JSON.stringify(e.payload, null, 2)),
    el("div", { class: "row" },
      el("button", { type: "button", onclick: () => copy(JSON.stringify(e), "the event as JSON") }, "Copy as JSON"),
      el("button", { type: "button", onclick: () => copy(cliCommand(e), "a CLI command") }, "Copy as CLI command")));
}

function parseHeaders(text) {
  const headers = {};
  for (const part of text.split(",")) {
    const item = part.trim();
    if (!item) continue;
    const at = item.indexOf("=");
    if (at < 1) throw new Error(`header ${JSON.stringify(item)} is not name=value`);
    headers[item.slice(0, at).trim()] = item.slice(at + 1).trim();
  }
  return Object.keys(headers).length ? headers : undefined;
}

async function submitAppend(event) {
  event.preventDefault();
  const box = $("#append-error");
  box.hidden = true;
  let body;
  try {
    body = { payload: JSON.parse($("#a-payload").value) };
    const key = $("#a-key").value;
    if (key) body.key = key;
    const headers = parseHeaders($("#a-headers").value);
    if (headers) body.headers = headers;
  } catch (exc) {
    showError({ message: exc.message, hint: "the payload must be JSON" }, box);
    return;
  }
  try {
    const result = await api(`topics/${encodeURIComponent(pattern)}/events`, { method: "POST", body });
    toast(`appended at offset ${fmtNum(result.offsets[0])}`);
    if (!live) await loadPage(true);
  } catch (exc) {
    showError(exc, box);
  }
}

function applyFilters(event) {
  event.preventDefault();
  filters.key = $("#f-key").value.trim();
  filters.q = $("#f-q").value.trim();
  filters.since = $("#f-since").value.trim();
  filters.until = $("#f-until").value.trim();
  const qs = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
  history.replaceState(null, "", location.pathname + (qs.toString() ? `?${qs}` : ""));
  const wasLive = live !== null;
  stopLive();
  loadPage(true).then(() => { if (wasLive) startLive(); });
}

const serverInfo = await chrome("topic");
$("#filters").addEventListener("submit", applyFilters);
$("#f-clear").addEventListener("click", (e) => {
  for (const id of ["#f-key", "#f-q", "#f-since", "#f-until"]) $(id).value = "";
  applyFilters(e);
});
$("#older").addEventListener("click", () => loadPage(false));
$("#live-toggle").addEventListener("click", startLive);
$("#live-pause").addEventListener("click", togglePause);
$("#live-stop").addEventListener("click", stopLive);
if (serverInfo && !serverInfo.read_only && !isPattern) {
  $("#append-section").hidden = false;
  $("#append-form").addEventListener("submit", submitAppend);
}
api("topics", { params: { limit: 1000 } }).then((t) => {
  const mine = t.topics.filter((x) => x.name === pattern);
  if (mine.length) {
    const x = mine[0];
    $("#topic-stats").textContent = `${fmtNum(x.events)} events in ${x.partitions} partition${x.partitions === 1 ? "" : "s"}, last append ${fmtAgo(x.last_append_ms)}`;
  } else if (isPattern) {
    $("#topic-stats").textContent = "a pattern: * is one name segment, # any number";
  }
}).catch(() => {});
await loadPage(true);
if (params.get("live") === "1") startLive();
