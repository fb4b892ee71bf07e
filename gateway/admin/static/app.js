// The console shell: sign-in, the three views behind #hash routes, the header state, keyboard shortcuts.

import {agentsView} from "./agents.js";
import {api, on, readiness, token, whoami} from "./api.js";
import {approvalsView} from "./approvals.js";
import {h} from "./dom.js";
import {tracesView} from "./traces.js";

const $ = (selector) => document.querySelector(selector);
const VIEWS = ["approvals", "traces", "agents"];
const READYZ_MS = 10000;
const CHORD_MS = 1200; // how long `g` waits for its second key

function toast(text, kind = "info") {
  const el = h("div", {class: `toast toast-${kind}`}, text);
  $("#toasts").append(el);
  setTimeout(() => el.remove(), 6000);
}

function announce(text) {
  const region = $("#announce");
  region.textContent = "";
  // A fresh text node after clearing makes screen readers read it even when the text repeats.
  requestAnimationFrame(() => { region.textContent = text; });
}

function setConn(id, state, detail) {
  const el = $(id);
  el.dataset.state = state;
  el.title = `${el.id === "api-state" ? "Admin API" : "Trace stream"}: ${state}${detail ? ` (${detail})` : ""}`;
}

const approvals = approvalsView($("#view-approvals"), {
  announce,
  toast,
  onCount(n) {
    $("#pending-count").textContent = n ? String(n) : "";
    document.title = n ? `(${n}) agent-gateway console` : "agent-gateway console";
  },
});
const traces = tracesView($("#view-traces"), {onStream: (state, detail) => setConn("#stream-state", state, detail)});
const agents = agentsView($("#view-agents"), {toast});

let current = null;
let signedIn = false;
let readyTimer = 0;

function route() {
  if (!signedIn) return;
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "approvals";
  if (name === current) return;
  if (current === "agents") agents.hide();
  current = name;
  for (const view of VIEWS) $(`#view-${view}`).hidden = view !== name;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "agents") agents.show();
  if (name === "approvals") approvals.refresh();
}

function go(name) {
  if (location.hash !== `#${name}`) location.hash = name;
  else route();
}

async function pollReady() {
  try {
    const {status, body} = await readiness();
    $("#policy-version").textContent = body.policy_version ?? "—";
    setConn("#api-state", status === 200 ? "live" : "retrying", status === 200 ? "" : "draining");
  } catch {
    setConn("#api-state", "retrying", "unreachable");
  }
}

function start() {
  signedIn = true;
  $("#signin").hidden = true;
  $("#nav").hidden = false;
  $("#sign-out").hidden = false;
  $("#who").textContent = whoami();
  approvals.start();
  traces.start();
  pollReady();
  readyTimer = setInterval(pollReady, READYZ_MS);
  current = null;
  route();
}

function stop(message) {
  signedIn = false;
  current = null;
  approvals.stop();
  traces.stop();
  agents.stop();
  clearInterval(readyTimer);
  for (const view of VIEWS) $(`#view-${view}`).hidden = true;
  $("#nav").hidden = true;
  $("#sign-out").hidden = true;
  $("#who").textContent = "";
  setConn("#api-state", "off", "");
  document.title = "agent-gateway console";
  $("#signin").hidden = false;
  const problem = $("#signin-error");
  problem.textContent = message ?? "";
  problem.hidden = !message;
  $("#signin-token").value = "";
  $("#signin-token").focus();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("#signin-token");
  const value = input.value.trim();
  if (!value) return;
  token.set(value);
  try {
    await api("/approvals", {query: {status: "pending"}}); // proves the token before showing anything
    start();
  } catch (err) {
    if (err.status !== 401) {
      token.clear();
      stop(`Could not check the token: ${err.message}`);
    }
  }
});

$("#sign-out").addEventListener("click", () => {
  token.clear();
  stop();
});

on("unauthorized", (message) => stop(`The gateway refused the token (${message}). Sign in again.`));
on("status", (ok, detail) => {
  if (signedIn) setConn("#api-state", ok ? "live" : "retrying", detail);
});

const help = $("#help");
$("#help-open").addEventListener("click", () => help.showModal());
$("#help-close").addEventListener("click", () => help.close());

// -- keyboard --------------------------------------------------------------------------------------------------
let chord = 0; // time `g` was pressed, 0 when no chord is pending

function typing(target) {
  return target instanceof HTMLElement
    && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey || event.defaultPrevented) return;
  if (help.open) return; // the dialog handles Esc itself
  if (event.key === "Escape" && current === "approvals" && approvals.key(event)) {
    event.preventDefault();
    return;
  }
  if (typing(event.target) || !signedIn) return;
  const key = event.key;
  if (chord && Date.now() - chord < CHORD_MS) {
    chord = 0;
    const target = {a: "approvals", t: "traces", g: "agents"}[key];
    if (target) {
      event.preventDefault();
      go(target);
      return;
    }
  }
  chord = 0;
  let handled = true;
  if (key === "g") chord = Date.now();
  else if (key === "1" || key === "2" || key === "3") go(VIEWS[Number(key) - 1]);
  else if (key === "?") help.showModal();
  else if (key === "/") {
    go("traces");
    traces.focusFilter();
  } else if (current === "approvals") handled = approvals.key(event);
  else if (current === "traces") handled = traces.key(event);
  else handled = false;
  if (handled) event.preventDefault();
});

window.addEventListener("hashchange", route);

if (token.get()) start();
else stop();
