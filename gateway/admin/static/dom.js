// Building DOM from untrusted data, and formatting it. Server text only ever becomes a Text node or an
// attribute value, never markup: the console never parses HTML from strings.

/** h("div", {class: "x", onclick: fn}, child, "text", [more]) -> HTMLElement. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) {
      if (typeof value !== "function") throw new TypeError(`${key} must be a function`);
      el.addEventListener(key.slice(2), value);
    } else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace all children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A value as an approver should read it: strings as they are, everything else as JSON. */
export function showValue(value) {
  if (typeof value === "string") return value;
  if (value === undefined) return "—";
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** 75 -> "1m 15s"; 4000 -> "1h 06m"; 200000 -> "2d 7h". Negative counts as zero. */
export function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** Unix seconds -> local "HH:MM:SS" (with ".mmm" when `millis`). */
export function clock(ts, millis = false) {
  if (typeof ts !== "number") return "—";
  const d = new Date(ts * 1000);
  const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return millis ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
}

/** Unix seconds -> local "YYYY-MM-DD HH:MM:SS", for tooltips. */
export function stamp(ts) {
  if (typeof ts !== "number") return "";
  const d = new Date(ts * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ts)}`;
}

/** 25000 -> "25,000"; 0.1234 -> "0.12". */
export function num(n, digits = 2) {
  if (typeof n !== "number" || !Number.isFinite(n)) return showValue(n);
  return n.toLocaleString("en-US", {maximumFractionDigits: digits});
}
