// Shared helpers for the dashboard pages: the API client, a DOM builder that only ever sets
// text (payloads are untrusted), formatting, the page chrome, polling that pauses while the
// tab is hidden, and hand-drawn SVG sparklines. No framework, no build step.

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || "HTTPError";
    this.hint = err.hint || "";
  }
}

// fetch() against /api/v1, JSON both ways. A 401 sends the browser to the login page.
export async function api(path, { method = "GET", body, params } = {}) {
  let url = path.startsWith("/") ? path : `/api/v1/${path}`;
  if (params) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) {
      if (v === undefined || v === null || v === "" || v === false) continue;
      if (Array.isArray(v)) v.forEach((item) => qs.append(k, item));
      else qs.append(k, String(v));
    }
    const text = qs.toString();
    if (text) url += `?${text}`;
  }
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (exc) {
    setConnection(false);
    throw new ApiError(0, { error: { type: "Offline", message: "the server does not answer", hint: "is eventlog serve running?" } });
  }
  setConnection(true);
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) data = await response.json();
  if (response.status === 401) {
    window.location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// el("td", {class: "num", title: "x"}, "text", child) -- strings become text nodes, never HTML.
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

// -- formatting ---------------------------------------------------------------------------

export function fmtNum(n) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString("en-US");
}

export function fmtRate(perSecond) {
  if (!perSecond) return "0/s";
  if (perSecond >= 100) return `${Math.round(perSecond).toLocaleString("en-US")}/s`;
  return `${perSecond.toFixed(perSecond >= 10 ? 1 : 2)}/s`;
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "–";
  const s = ms / 1000;
  if (s < 1) return `${Math.round(ms)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

export function fmtAgo(ms, now = Date.now()) {
  if (ms === null || ms === undefined) return "never";
  return `${fmtDuration(Math.max(0, now - ms))} ago`;
}

export function fmtTime(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  return d.toISOString().replace("T", " ").replace("Z", "Z");
}

export function preview(value, max = 140) {
  const text = value === undefined ? "" : JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export function shellQuote(text) {
  return `'${String(text).replace(/'/g, `'\\''`)}'`;
}

// -- page chrome ---------------------------------------------------------------------------

let connectionPill = null;
let serverInfo = null;

export function setConnection(ok) {
  if (!connectionPill) return;
  connectionPill.textContent = ok ? "connected" : "offline";
  connectionPill.className = `pill ${ok ? "ok" : "bad"}`;
}

// Builds the header (navigation, dead-letter badge, connection pill) and returns /info.
export async function chrome(active) {
  const nav = [
    ["overview", "/", "Overview"],
    ["groups", "/groups", "Groups"],
    ["dead-letters", "/dead-letters", "Dead letters"],
  ];
  const badge = el("span", { class: "badge", id: "dl-badge", hidden: true });
  connectionPill = el("span", { class: "pill", id: "connection" }, "connecting");
  const header = el("header", { class: "top" },
    el("a", { class: "brand", href: "/" }, "eventlog"),
    el("nav", {}, nav.map(([key, href, label]) =>
      el("a", { href, class: key === active ? "active" : "" }, label, key === "dead-letters" ? badge : null))),
    el("span", { class: "spacer" }),
    el("span", { class: "db", id: "db-name" }),
    el("span", { class: "pill warn", id: "ro-pill", hidden: true }, "read-only"),
    connectionPill);
  document.body.prepend(header);
  await refreshInfo();
  return serverInfo;
}

export async function refreshInfo() {
  try {
    serverInfo = await api("info");
  } catch (exc) {
    return serverInfo;
  }
  const badge = $("#dl-badge");
  if (badge) {
    badge.textContent = fmtNum(serverInfo.dead_letters.pending);
    badge.hidden = !serverInfo.dead_letters.pending;
  }
  const name = $("#db-name");
  if (name) name.textContent = serverInfo.db.split("/").pop();
  const ro = $("#ro-pill");
  if (ro) ro.hidden = !serverInfo.read_only;
  document.body.classList.toggle("read-only", serverInfo.read_only);
  return serverInfo;
}

export function info() {
  return serverInfo;
}

// Runs fn now and every `ms` while the tab is visible; stops while it is hidden.
export function poll(fn, ms) {
  let timer = null;
  let running = false;
  async function tick() {
    timer = null;
    if (document.visibilityState !== "visible") return;
    if (!running) {
      running = true;
      try {
        await fn();
      } catch (exc) {
        if (!(exc instanceof ApiError)) console.error(exc);
      } finally {
        running = false;
      }
    }
    if (document.visibilityState === "visible") timer = setTimeout(tick, ms);
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && timer === null) tick();
    else if (document.visibilityState !== "visible" && timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
  });
  tick();
  return { now: () => { if (timer !== null) clearTimeout(timer); tick(); } };
}

export function toast(message, kind = "ok") {
  let box = $("#toasts");
  if (!box) {
    box = el("div", { id: "toasts", role: "status" });
    document.body.appendChild(box);
  }
  const item = el("div", { class: `toast ${kind}` }, message);
  box.appendChild(item);
  setTimeout(() => item.remove(), kind === "ok" ? 4000 : 9000);
}

export function showError(exc, where) {
  const text = exc.hint ? `${exc.message} — ${exc.hint}` : exc.message;
  if (where) {
    clear(where).appendChild(el("div", { class: "error" }, text));
    where.hidden = false;
  } else {
    toast(text, "bad");
  }
}

// -- sparklines ----------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

export function sparkline(values, { width = 240, height = 40, label = "" } = {}) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  if (values.length < 2) return svg;
  const max = Math.max(1, ...values);
  const step = width / (values.length - 1);
  const points = values.map((v, i) => [i * step, height - 2 - (v / max) * (height - 4)]);
  const line = points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("points", `0,${height} ${line} ${width},${height}`);
  area.setAttribute("class", "spark-area");
  const poly = document.createElementNS(SVG, "polyline");
  poly.setAttribute("points", line);
  poly.setAttribute("class", "spark-line");
  svg.append(area, poly);
  return svg;
}

// -- drawers and dialogs --------------------------------------------------------------------

export function drawer(title, ...content) {
  closeDrawer();
  const panel = el("aside", { class: "drawer", id: "drawer", role: "dialog", "aria-label": title },
    el("div", { class: "drawer-head" },
      el("h2", {}, title),
      el("button", { type: "button", class: "close", onclick: closeDrawer, "aria-label": "Close" }, "×")),
    el("div", { class: "drawer-body" }, content));
  document.body.appendChild(panel);
  return panel;
}

export function closeDrawer() {
  const old = $("#drawer");
  if (old) old.remove();
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") closeDrawer();
});

export function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

export async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    toast(`copied ${what}`);
  } catch (exc) {
    toast(`could not copy: ${exc.message}`, "bad");
  }
}

export function table(headers, rows, { empty = "nothing here", cls = "" } = {}) {
  const body = el("tbody", {}, rows);
  const t = el("table", { class: cls },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : "" }, h.label ?? h)))),
    body);
  if (!rows.length) body.appendChild(el("tr", { class: "empty" }, el("td", { colspan: headers.length }, empty)));
  return t;
}

export function num(value, extra = {}) {
  return el("td", { class: "num", ...extra }, value);
}
