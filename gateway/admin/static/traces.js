// Live traces: GET /traces/stream read with fetch() (EventSource cannot send the Authorization header),
// newest on top, capped, filtered in the browser, pausable, reconnecting with backoff.

import {authHeaders, failure, url} from "./api.js";
import {clock, h, num, stamp} from "./dom.js";

const CAP = 500;
const BACKOFF_MIN = 500;
const BACKOFF_MAX = 15000;
const DECISIONS = new Set(["allow", "deny", "hold"]);

/** The `data:` lines of one server-sent event block joined, or null for a comment/keep-alive. */
export function eventData(block) {
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

function summary(ev) {
  if (ev.kind === "tail_dropped") return `${ev.count} events dropped: the console fell behind the stream`;
  return [ev.upstream, ev.verb, ev.resource ?? ev.tool].filter((x) => x != null && x !== "").join(" · ") || ev.kind || "";
}

function row(ev) {
  const decision = typeof ev.decision === "string" ? ev.decision : "";
  const tone = DECISIONS.has(decision) ? decision : ev.kind ? "note" : "other";
  const outcome = ev.approval && ev.approval.outcome ? ` → ${ev.approval.outcome}` : "";
  const failed = typeof ev.status === "number" && ev.status >= 400;
  const why = ev.error ? `${ev.error}${ev.reason ? `: ${ev.reason}` : ""}` : ev.reason ?? "";
  const details = h("details", {class: `tr tone-${tone}`, dataset: {agent: ev.agent ?? "", decision: decision || ev.kind || ""}},
    h("summary", {},
      h("time", {class: "mono", title: stamp(ev.ts)}, clock(ev.ts, true)),
      h("span", {class: `dec dec-${tone}`}, (decision || ev.kind || "event") + outcome),
      h("span", {class: "ag"}, ev.agent ?? "—"),
      h("span", {class: `st mono${failed ? " failed" : ""}`}, ev.status ?? ""),
      h("span", {class: "act mono", title: summary(ev)}, summary(ev)),
      h("span", {class: "rule mono", title: ev.rule ?? ""}, ev.rule ?? ""),
      h("span", {class: "lat mono"}, typeof ev.latency_ms === "number" ? `${num(ev.latency_ms, 0)} ms` : ""),
      h("span", {class: "why", title: why}, why)));
  // The full JSON is built on first open only: 500 pretty-printed events would be wasted work.
  details.addEventListener("toggle", () => {
    if (details.open && !details.querySelector("pre")) details.append(h("pre", {class: "json"}, JSON.stringify(ev, null, 2)));
  });
  return details;
}

/** The traces view. `ctx.onStream(state, detail)` reports "connecting" | "live" | "retrying" | "off". */
export function tracesView(root, ctx) {
  const list = root.querySelector("#trace-list");
  const agentFilter = root.querySelector("#trace-agent");
  const decisionFilter = root.querySelector("#trace-decision");
  const pauseButton = root.querySelector("#trace-pause");
  const clearButton = root.querySelector("#trace-clear");
  const counter = root.querySelector("#trace-count");
  const empty = root.querySelector("#trace-empty");
  const head = root.querySelector("#trace-head");
  const status = root.querySelector("#trace-status");
  let queue = []; // received, not yet on screen (while paused, or until the next frame)
  let paused = false;
  let frame = 0;
  let controller = null;
  let retry = 0;
  let backoff = BACKOFF_MIN;
  let running = false;

  function matches(el) {
    const agent = agentFilter.value.trim().toLowerCase();
    const decision = decisionFilter.value;
    return (!agent || el.dataset.agent.toLowerCase().includes(agent)) && (!decision || el.dataset.decision === decision);
  }

  function applyFilter() {
    let shown = 0;
    for (const el of list.children) {
      el.hidden = !matches(el);
      if (!el.hidden) shown += 1;
    }
    updateCount(shown);
  }

  function updateCount(shown = [...list.children].filter((el) => !el.hidden).length) {
    const total = list.children.length;
    const waiting = paused && queue.length ? ` · ${queue.length} new while paused` : "";
    counter.textContent = `${shown === total ? total : `${shown} of ${total}`} events${waiting}`;
    empty.hidden = total > 0;
    head.hidden = total === 0;
  }

  const STATES = {connecting: "stream: connecting…", live: "stream: live", off: ""};
  function report(state, detail) {
    status.dataset.state = state;
    status.textContent = state === "retrying" ? `stream: ${detail}` : STATES[state];
    ctx.onStream(state, detail);
  }

  function receive(ev) {
    queue.push(ev);
    if (queue.length > CAP) queue = queue.slice(-CAP);
    if (paused) updateCount();
    else if (!frame) frame = requestAnimationFrame(flush);
  }

  function flush() {
    frame = 0;
    if (paused || !queue.length) return;
    const batch = document.createDocumentFragment();
    for (let i = queue.length - 1; i >= 0; i -= 1) {
      const el = row(queue[i]);
      el.hidden = !matches(el);
      batch.append(el);
    }
    queue = [];
    list.prepend(batch);
    while (list.children.length > CAP) list.lastElementChild.remove();
    updateCount();
  }

  function setPaused(value) {
    paused = value;
    pauseButton.setAttribute("aria-pressed", String(paused));
    pauseButton.firstChild.textContent = paused ? "Resume " : "Pause ";
    root.classList.toggle("paused", paused);
    if (!paused) flush();
    updateCount();
  }

  async function connect() {
    if (!running) return;
    controller = new AbortController();
    report("connecting", "");
    try {
      const response = await fetch(url("/traces/stream"), {
        headers: authHeaders({Accept: "text/event-stream"}), signal: controller.signal, cache: "no-store"});
      if (!response.ok) throw await failure(response);
      report("live", "");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        backoff = BACKOFF_MIN; // the connection works: a later drop retries quickly
        buffer += value;
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop();
        for (const block of blocks) {
          const data = eventData(block);
          if (data === null) continue;
          try {
            receive(JSON.parse(data));
          } catch {
            console.warn("trace stream: an event that is not JSON was skipped");
          }
        }
      }
      throw new Error("the stream ended");
    } catch (error) {
      if (!running || error.name === "AbortError" || error.status === 401) return;
      const wait = backoff;
      backoff = Math.min(backoff * 2, BACKOFF_MAX);
      const why = !error.status ? error.message
        : error.message.startsWith(String(error.status)) ? `HTTP ${error.message}` : `HTTP ${error.status}: ${error.message}`;
      report("retrying", `${why}; retrying in ${Math.ceil(wait / 1000)}s`);
      retry = setTimeout(connect, wait + Math.random() * 250);
    }
  }

  agentFilter.addEventListener("input", applyFilter);
  decisionFilter.addEventListener("change", applyFilter);
  for (const input of [agentFilter, decisionFilter]) {
    input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        input.blur();
      }
    });
  }
  pauseButton.addEventListener("click", () => setPaused(!paused));
  clearButton.addEventListener("click", () => {
    list.replaceChildren();
    queue = [];
    updateCount();
  });

  return {
    start() {
      running = true;
      backoff = BACKOFF_MIN;
      connect();
    },
    stop() {
      running = false;
      clearTimeout(retry);
      if (controller) controller.abort();
      cancelAnimationFrame(frame);
      frame = 0;
      queue = [];
      list.replaceChildren();
      setPaused(false);
      report("off", "");
    },
    focusFilter() {
      agentFilter.focus();
      agentFilter.select();
    },
    key(event) {
      if (event.key === "p") {
        setPaused(!paused);
        return true;
      }
      return false;
    },
  };
}
