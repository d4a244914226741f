// The tab's one EventSource (browsers allow six connections per host, and every open tab
// counts). It is released while the tab is hidden and reopened, from the last event seen,
// when the tab is shown again. The browser itself reconnects after a dropped connection
// (sending Last-Event-ID, which the server prefers); when it gives up (a non-200 answer such
// as 503 or 401) this reopens the stream with backoff and ?after= the last id.

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

export class LiveStream {
  // onEvent(event), onState("live" | "connecting" | "reconnecting" | "closed"), onGap(info)
  constructor({ topics, after, onEvent, onState, onGap }) {
    this.topics = topics;
    this.lastId = after;
    this.onEvent = onEvent;
    this.onState = onState || (() => {});
    this.onGap = onGap || (() => {});
    this.source = null;
    this.failures = 0;
    this.timer = null;
    this.stopped = false;
    this.onVisibility = () => this.visibilityChanged();
    document.addEventListener("visibilitychange", this.onVisibility);
    if (LiveStream.current) LiveStream.current.stop();
    LiveStream.current = this;
    this.open();
  }

  url() {
    const qs = new URLSearchParams();
    for (const t of this.topics) qs.append("topic", t);
    qs.set("after", String(this.lastId));
    return `/api/v1/stream?${qs}`;
  }

  open() {
    if (this.stopped || this.source || document.visibilityState !== "visible") return;
    this.onState(this.failures ? "reconnecting" : "connecting");
    const source = new EventSource(this.url());
    this.source = source;
    source.onopen = () => {
      this.failures = 0;
      this.onState("live");
    };
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      this.lastId = event.offset;
      this.onEvent(event);
    };
    source.addEventListener("gap", (message) => this.onGap(JSON.parse(message.data)));
    source.addEventListener("bye", () => this.onState("reconnecting"));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        // A non-200 answer (or a broken response): the browser gave up; we do not.
        this.release();
        this.failures += 1;
        this.onState("reconnecting");
        const wait = BACKOFF_MS[Math.min(this.failures - 1, BACKOFF_MS.length - 1)];
        this.timer = setTimeout(() => { this.timer = null; this.open(); }, wait * (0.75 + Math.random() / 2));
      } else {
        this.onState("reconnecting"); // the browser retries by itself, with Last-Event-ID
      }
    };
  }

  release() {
    if (this.source) {
      this.source.close();
      this.source = null;
    }
  }

  visibilityChanged() {
    if (this.stopped) return;
    if (document.visibilityState === "visible") {
      this.open();
    } else {
      if (this.timer) { clearTimeout(this.timer); this.timer = null; }
      this.release();
      this.onState("paused");
    }
  }

  stop() {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.release();
    document.removeEventListener("visibilitychange", this.onVisibility);
    if (LiveStream.current === this) LiveStream.current = null;
    this.onState("closed");
  }
}

LiveStream.current = null;
