// The approval queue: pending approvals (polled every 2 s), the approve/deny form, and decided history.

import {api, Poller, serverNow} from "./api.js";
import {clock, duration, fill, h, showValue, stamp} from "./dom.js";

const POLL_MS = 2000;
const HISTORY_LIMIT = 100;
const URGENT_S = 60; // a countdown below this is shown as urgent
export const CATEGORIES = ["policy_gap", "data_quality", "edge_case", "other"];
const STATUSES = new Set(["pending", "approved", "denied", "timeout", "abandoned"]);
const REMEMBER = [["", "don't remember"], ["30m", "30 minutes"], ["8h", "8 hours"], ["24h", "24 hours"]];

const action = (a) => [a.upstream, a.verb, a.resource ?? a.tool].filter((x) => x != null && x !== "").join(" · ");
const newestFirst = (x, y) => (y.created_at ?? 0) - (x.created_at ?? 0);

function evidenceTable(evidence) {
  const entries = Object.entries(evidence && typeof evidence === "object" ? evidence : {});
  if (!entries.length) return h("p", {class: "muted small"}, "No evidence: the rule has no condition.");
  return h("table", {class: "kv"},
    h("caption", {title: "The values the rule's condition looked at"}, "evidence"),
    h("tbody", {}, entries.map(([key, value]) =>
      h("tr", {}, h("th", {scope: "row", class: "mono"}, key), h("td", {class: "mono"}, showValue(value))))));
}

/** The queue view. `ctx`: {announce(text), toast(text, kind), onCount(n), isActive()}. */
export function approvalsView(root, ctx) {
  const list = root.querySelector("#queue");
  const empty = root.querySelector("#queue-empty");
  const error = root.querySelector("#queue-error");
  const historyToggle = root.querySelector("#history-toggle");
  const historyBox = root.querySelector("#history");
  const historyBody = root.querySelector("#history-body");
  const rows = new Map(); // id -> {el, slot, left, age, approval}
  let selected = null;
  let form = null; // {id, kind, el}
  let loaded = false;
  let historySig = "";

  const poller = new Poller(load, POLL_MS);
  const clockTimer = {id: 0};

  async function load() {
    try {
      const data = await api("/approvals", {query: {status: "pending"}});
      render((data.approvals ?? []).filter((a) => a.status === "pending" || a.status == null));
      if (!historyBox.hidden) await loadHistory();
      error.hidden = true;
    } catch (err) {
      if (err.status === 401) return;
      error.textContent = `Could not load approvals: ${err.message}`;
      error.hidden = false;
    }
  }

  function render(approvals) {
    approvals.sort(newestFirst);
    const fresh = approvals.filter((a) => !rows.has(a.id));
    // Keyed update: existing rows stay where they are (an open form keeps its text and focus).
    let cursor = list.firstElementChild;
    const keep = new Set();
    for (const approval of approvals) {
      keep.add(approval.id);
      let row = rows.get(approval.id);
      if (!row) {
        row = buildRow(approval);
        rows.set(approval.id, row);
      }
      row.approval = approval;
      if (row.el === cursor) cursor = cursor.nextElementSibling;
      else list.insertBefore(row.el, cursor);
    }
    for (const [id, row] of rows) {
      if (keep.has(id)) continue;
      if (form && form.id === id) {
        // Decided by someone else while this approver was typing: keep the row and say who and why.
        if (!row.stale) showDecided(id, null);
        continue;
      }
      removeRow(id);
    }
    if (loaded && fresh.length) {
      ctx.announce(fresh.map((a) => `New approval: ${a.agent} wants ${action(a)}`).join(". "));
    }
    loaded = true;
    if (!rows.has(selected)) select(approvals.length ? approvals[0].id : null);
    empty.hidden = rows.size > 0;
    ctx.onCount(approvals.length);
    tick();
  }

  function buildRow(a) {
    const left = h("span", {class: "left mono"});
    const age = h("span", {class: "age mono", title: `created ${stamp(a.created_at)}`});
    const slot = h("div", {class: "slot"});
    const el = h("li", {class: "appr", tabindex: "-1", dataset: {id: a.id}},
      h("div", {class: "appr-main"},
        h("div", {class: "appr-head"},
          h("span", {class: "agent"}, a.agent),
          h("span", {class: "action mono"}, action(a)),
          a.method && a.path ? h("span", {class: "muted mono small"}, `${a.method} ${a.path}`) : null),
        h("div", {class: "appr-why"},
          h("span", {class: "rule mono"}, a.rule), h("span", {class: "reason"}, a.reason)),
        evidenceTable(a.evidence)),
      h("div", {class: "appr-side"},
        h("div", {class: "times"}, left, age),
        h("div", {class: "actions"},
          h("button", {type: "button", class: "btn approve", onclick: () => openForm(a.id, "approve")},
            "Approve", h("kbd", {"aria-hidden": "true"}, "a")),
          h("button", {type: "button", class: "btn deny", onclick: () => openForm(a.id, "deny")},
            "Deny", h("kbd", {"aria-hidden": "true"}, "d")))),
      slot);
    el.addEventListener("click", () => select(a.id, false));
    return {el, slot, left, age, approval: a};
  }

  function removeRow(id) {
    const row = rows.get(id);
    if (!row) return;
    const next = row.el.nextElementSibling ?? row.el.previousElementSibling;
    row.el.remove();
    rows.delete(id);
    if (selected === id) select(next ? next.dataset.id : null);
  }

  function tick() {
    const now = serverNow();
    for (const {approval: a, left, age} of rows.values()) {
      const remaining = (a.expires_at ?? now) - now;
      left.textContent = remaining > 0 ? `${duration(remaining)} left` : "expired";
      left.classList.toggle("urgent", remaining < URGENT_S);
      age.textContent = `${duration(now - (a.created_at ?? now))} ago`;
    }
  }

  function select(id, scroll = true) {
    if (selected && rows.has(selected)) rows.get(selected).el.removeAttribute("aria-current");
    selected = id;
    const row = rows.get(id);
    if (!row) return;
    row.el.setAttribute("aria-current", "true");
    if (scroll) row.el.scrollIntoView({block: "nearest"});
  }

  function move(step) {
    const ids = [...list.children].map((el) => el.dataset.id);
    if (!ids.length) return;
    const at = ids.indexOf(selected);
    const next = ids[Math.min(ids.length - 1, Math.max(0, at < 0 ? 0 : at + step))];
    select(next);
    rows.get(next).el.focus({preventScroll: true});
  }

  function openForm(id, kind) {
    const row = rows.get(id);
    if (!row) return;
    closeForm(false);
    select(id, false);
    const reason = h("textarea", {name: "reason", rows: "2", required: true, maxlength: "2000",
      placeholder: kind === "approve" ? "Why is this call fine?" : "Why must this call not happen?"});
    const category = h("select", {name: "category"},
      CATEGORIES.map((c) => h("option", {value: c, selected: c === "other"}, c.replace("_", " "))));
    const remember = kind === "approve"
      ? h("select", {name: "remember"}, REMEMBER.map(([value, label]) => h("option", {value}, label))) : null;
    const problem = h("p", {class: "form-error", role: "alert", hidden: true});
    const submit = h("button", {type: "submit", class: `btn ${kind}`}, kind === "approve" ? "Approve" : "Deny");
    const el = h("form", {class: `decide ${kind}`, "aria-label": `${kind} ${row.approval.agent}: ${action(row.approval)}`},
      h("label", {class: "grow"}, h("span", {}, "Reason ", h("span", {class: "muted"}, "(required)")), reason),
      h("label", {}, h("span", {}, "Category"), category),
      remember ? h("label", {}, h("span", {}, "Remember for"), remember) : null,
      h("div", {class: "form-buttons"},
        submit,
        h("button", {type: "button", class: "btn", onclick: () => closeForm(true)}, "Cancel"),
        h("span", {class: "muted small hint"}, "Enter submits · Shift+Enter new line · Esc cancels")),
      problem);
    el.addEventListener("submit", (event) => {
      event.preventDefault();
      decide(id, kind, {reason, category, remember, submit, problem});
    });
    el.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        closeForm(true);
      } else if (event.key === "Enter" && !event.isComposing) {
        // Reasons are short: Enter submits, Shift+Enter is a new line; a focused button keeps its own Enter.
        const own = event.target.tagName === "BUTTON" || (event.target === reason && event.shiftKey);
        if (event.ctrlKey || event.metaKey || !own) {
          event.preventDefault();
          el.requestSubmit();
        }
      }
    });
    row.slot.replaceChildren(el);
    row.el.classList.add("deciding");
    form = {id, kind, el, problem, submit};
    reason.focus();
  }

  function closeForm(refocus) {
    if (!form) return;
    const row = rows.get(form.id);
    form = null;
    if (!row) return;
    if (row.stale) {
      removeRow(row.approval.id);
      empty.hidden = rows.size > 0;
      if (refocus && rows.has(selected)) rows.get(selected).el.focus({preventScroll: true});
      return;
    }
    row.slot.replaceChildren();
    row.el.classList.remove("deciding");
    if (refocus) row.el.focus({preventScroll: true});
  }

  async function decide(id, kind, {reason, category, remember, submit, problem}) {
    const text = reason.value.trim();
    if (!text) {
      problem.textContent = "A reason is required: it is recorded with the decision.";
      problem.hidden = false;
      reason.focus();
      return;
    }
    const body = {reason: text, category: category.value};
    if (remember && remember.value) body.remember = remember.value;
    const row = rows.get(id);
    submit.disabled = true;
    problem.hidden = true;
    try {
      const result = await api(`/approvals/${encodeURIComponent(id)}/${kind}`, {method: "POST", body});
      const what = row ? `${row.approval.agent}: ${action(row.approval)}` : id;
      ctx.toast(`${result.status ?? (kind === "approve" ? "approved" : "denied")} — ${what}`, kind === "approve" ? "ok" : "bad");
      form = null;
      removeRow(id);
      const next = rows.get(selected);
      if (next) next.el.focus({preventScroll: true});
      poller.now();
    } catch (err) {
      if (err.status === 401) return;
      if (err.status === 409) {
        await showDecided(id, err);
        return;
      }
      problem.textContent = `${err.message} (HTTP ${err.status || "—"})`;
      problem.hidden = false;
      submit.disabled = err.status === 404;
    }
  }

  /** Someone else decided `id` first: the open form says who and why, and can only be cancelled. */
  async function showDecided(id, err) {
    const row = rows.get(id);
    if (row && !row.stale) {
      row.stale = true;
      row.el.classList.add("stale");
      for (const button of row.el.querySelectorAll(".actions button")) button.disabled = true;
    }
    const text = await alreadyDecided(id, err);
    if (!form || form.id !== id) return;
    form.problem.textContent = `${text} — Esc to dismiss`;
    form.problem.hidden = false;
    form.submit.disabled = true;
  }

  async function alreadyDecided(id, err) {
    let approval = null;
    try {
      approval = await api(`/approvals/${encodeURIComponent(id)}`);
    } catch {
      try {
        const data = await api("/approvals", {query: {limit: 200}});
        approval = (data.approvals ?? []).find((a) => a.id === id) ?? null;
      } catch {
        approval = null;
      }
    }
    if (!approval || !approval.decided_by) return `Already decided${err ? `: ${err.message}` : " elsewhere"}`;
    const why = approval.decision_reason ? `: “${approval.decision_reason}”` : "";
    return `Already ${approval.status} by ${approval.decided_by}${why}`;
  }

  async function loadHistory() {
    const data = await api("/approvals", {query: {limit: HISTORY_LIMIT}});
    const decided = (data.approvals ?? []).filter((a) => a.status !== "pending")
      .sort((x, y) => (y.decided_at ?? y.created_at ?? 0) - (x.decided_at ?? x.created_at ?? 0))
      .slice(0, HISTORY_LIMIT);
    const sig = decided.map((a) => `${a.id}:${a.status}`).join(",");
    if (sig === historySig) return;
    historySig = sig;
    fill(historyBody, decided.length ? decided.map(historyRow)
      : h("tr", {}, h("td", {colspan: "7", class: "muted"}, "No decided approvals yet.")));
  }

  function historyRow(a) {
    return h("tr", {dataset: {id: a.id, status: a.status}},
      h("td", {class: "mono", title: stamp(a.decided_at)}, clock(a.decided_at ?? a.created_at)),
      h("td", {}, h("span", {class: `status status-${STATUSES.has(a.status) ? a.status : "other"}`}, a.status)),
      h("td", {}, a.agent),
      h("td", {class: "mono"}, action(a)),
      h("td", {}, a.decided_by ?? "—"),
      h("td", {}, a.category ? a.category.replace("_", " ") : "—"),
      h("td", {class: "why"}, a.decision_reason ?? ""));
  }

  function toggleHistory() {
    const show = historyBox.hidden;
    historyBox.hidden = !show;
    historyToggle.setAttribute("aria-expanded", String(show));
    historyToggle.firstChild.textContent = show ? "Hide history " : "Show history ";
    if (show) {
      historySig = "";
      loadHistory().catch((err) => ctx.toast(`History: ${err.message}`, "bad"));
    }
  }
  historyToggle.addEventListener("click", toggleHistory);

  return {
    start() {
      poller.start();
      clockTimer.id = setInterval(tick, 1000);
    },
    stop() {
      poller.stop();
      clearInterval(clockTimer.id);
      form = null;
      rows.clear();
      list.replaceChildren();
      historyBody.replaceChildren();
      historySig = "";
      loaded = false;
      selected = null;
    },
    refresh: () => poller.now(),
    /** Keys for this view; returns true when handled. */
    key(event) {
      switch (event.key) {
        case "j": move(1); return true;
        case "k": move(-1); return true;
        case "a": if (selected) openForm(selected, "approve"); return true;
        case "d": if (selected) openForm(selected, "deny"); return true;
        case "h": toggleHistory(); return true;
        case "Escape": if (form) { closeForm(true); return true; } return false;
        default: return false;
      }
    },
  };
}
