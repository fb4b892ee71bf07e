// Agents: one card per agent (GET /agents, polled while the view is open), with pause and resume.

import {api, Poller, serverNow} from "./api.js";
import {duration, fill, h, num, showValue} from "./dom.js";

const POLL_MS = 5000;
const EFFECTS = ["allow", "hold", "deny"];
let uid = 0;

const PERIODS = {1: "second", 60: "minute", 3600: "hour", 86400: "day"};

function amount(value, unit) {
  if (unit !== "usd" || typeof value !== "number") return num(value, 0);
  return `$${value.toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2})}`;
}

/** A used/limit bar; `tone` turns amber at 80 % and red at 100 %. */
function gauge(id, used, limit, text, note, agentId) {
  // Limit ids are `<agent>.yaml#budgets[0]`: inside the agent's own card the file part says nothing new.
  const prefix = `${agentId}.yaml#`;
  const label = String(id).startsWith(prefix) ? String(id).slice(prefix.length) : String(id);
  const ratio = limit > 0 ? Math.min(1, used / limit) : 1;
  const tone = ratio >= 1 ? "full" : ratio >= 0.8 ? "high" : "ok";
  const fillBar = h("span", {class: `gauge-fill gauge-${tone}`});
  fillBar.style.setProperty("width", `${(ratio * 100).toFixed(1)}%`); // CSSOM, allowed by the CSP
  return h("div", {class: "gauge-row"},
    h("div", {class: "gauge-label"}, h("span", {class: "mono name", title: String(id)}, label), h("span", {class: "mono value"}, text)),
    h("div", {class: "gauge", role: "meter", "aria-label": String(id), "aria-valuemin": "0",
      "aria-valuemax": String(limit), "aria-valuenow": String(Math.min(used, limit)), "aria-valuetext": text}, fillBar),
    note ? h("div", {class: "muted small"}, note) : null);
}

function grantsTable(grants) {
  const byUpstream = new Map();
  for (const grant of grants ?? []) {
    const cells = byUpstream.get(grant.upstream) ?? {allow: [], hold: [], deny: []};
    const verbs = (grant.verbs ?? []).length ? grant.verbs.join(", ") : "any verb";
    const resources = (grant.resources ?? []).length ? ` (${grant.resources.join(", ")})` : "";
    const staged = grant.enforce && grant.enforce !== "enforce" ? h("span", {class: "tag"}, grant.enforce) : null;
    (cells[grant.effect] ?? cells.deny).push(h("span", {class: "grant", title: grant.rule ?? ""}, verbs + resources, staged));
    byUpstream.set(grant.upstream, cells);
  }
  if (!byUpstream.size) return h("p", {class: "muted small"}, "No grants: every call is denied.");
  return h("table", {class: "grants"},
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "upstream"), EFFECTS.map((e) => h("th", {scope: "col", class: `eff-${e}`}, e)))),
    h("tbody", {}, [...byUpstream].map(([upstream, cells]) =>
      h("tr", {}, h("th", {scope: "row", class: "mono"}, upstream ?? "any"),
        EFFECTS.map((e) => h("td", {class: `eff-${e}`}, cells[e].length ? cells[e] : h("span", {class: "muted"}, "—")))))));
}

function limits(agent) {
  const now = serverNow();
  const budgets = (agent.budgets ?? []).map((b) => gauge(b.id, b.used, b.limit,
    `${amount(b.used, b.unit)} / ${amount(b.limit, b.unit)} ${b.unit === "usd" ? "" : b.unit}`.trim(),
    `window ${showValue(b.window)} · resets in ${duration((b.resets_at ?? now) - now)}`, agent.id));
  const rates = (agent.rate_limits ?? []).map((r) => gauge(r.id, r.limit - r.remaining, r.limit,
    `${num(r.remaining, 0)} of ${num(r.limit, 0)} ${r.unit} left`, `per ${PERIODS[r.per_seconds] ?? duration(r.per_seconds)}`,
    agent.id));
  const staged = (agent.staged ?? []).map((row) => h("div", {class: "staged-row"},
    h("span", {class: "mono name", title: row.rule}, String(row.rule).replace(`${agent.id}.yaml#`, "")),
    h("span", {class: "tag"}, `${row.enforce} ${row.effect}`),
    h("span", {class: "mono value"}, Object.keys(row.counts ?? {}).length
      ? Object.entries(row.counts).map(([what, n]) => `${what.replace("_", " ")}: ${num(n, 0)}`).join(" · ")
      : "no matches yet")));
  return [
    ...(staged.length ? [h("h3", {}, "Staged rules"), ...staged] : []),
    h("h3", {}, "Budgets"), budgets.length ? budgets : h("p", {class: "muted small"}, "No budgets."),
    h("h3", {}, "Rate limits"), rates.length ? rates : h("p", {class: "muted small"}, "No rate limits."),
  ];
}

/** The agents view. `ctx`: {toast(text, kind), showApprovals()}. */
export function agentsView(root, ctx) {
  const grid = root.querySelector("#agent-grid");
  const note = root.querySelector("#agents-note");
  const cards = new Map(); // id -> {el, body, slot, agent}
  const poller = new Poller(load, POLL_MS);

  async function load() {
    try {
      const data = await api("/agents");
      note.hidden = true;
      render(data.agents ?? []);
    } catch (err) {
      if (err.status === 401) return;
      note.textContent = err.status === 404
        ? "This gateway does not serve GET /agents yet (HTTP 404)."
        : `Could not load agents: ${err.message}`;
      note.hidden = false;
    }
  }

  function render(agents) {
    agents.sort((x, y) => String(x.id).localeCompare(String(y.id)));
    const keep = new Set();
    let cursor = grid.firstElementChild;
    for (const agent of agents) {
      keep.add(agent.id);
      let card = cards.get(agent.id);
      if (!card) {
        card = buildCard(agent.id);
        cards.set(agent.id, card);
      }
      // Unchanged cards are left alone, and so is the one holding keyboard focus: a refresh must not steal it.
      const sig = JSON.stringify(agent);
      if (sig !== card.sig && !card.body.contains(document.activeElement)) {
        card.sig = sig;
        card.agent = agent;
        fill(card.body, cardBody(card, agent));
      }
      if (card.el === cursor) cursor = cursor.nextElementSibling;
      else grid.insertBefore(card.el, cursor);
    }
    for (const [id, card] of cards) {
      if (!keep.has(id)) {
        card.el.remove();
        cards.delete(id);
      }
    }
  }

  function buildCard(id) {
    const titleId = `agent-title-${(uid += 1)}`;
    const body = h("div", {class: "card-body"});
    const slot = h("div", {class: "slot"});
    const el = h("article", {class: "card", "aria-labelledby": titleId, dataset: {agent: id}}, body, slot);
    return {el, body, slot, titleId, agent: null, sig: ""};
  }

  function cardBody(card, agent) {
    const paused = agent.paused;
    const button = paused
      ? h("button", {type: "button", class: "btn", onclick: () => openForm(card, "resume")}, "Resume")
      : h("button", {type: "button", class: "btn deny", onclick: () => openForm(card, "pause")}, "Pause");
    const pending = agent.pending_approvals ?? 0;
    return [
      h("header", {class: "card-head"},
        h("h2", {id: card.titleId, class: "mono"}, agent.id),
        agent.mode ? h("span", {class: "pill"}, agent.mode) : null,
        paused ? h("span", {class: "pill pill-bad"}, "paused") : h("span", {class: "pill pill-ok"}, "active"),
        h("span", {class: "spacer"}),
        button),
      paused ? h("p", {class: "paused-note"},
        `Paused by ${paused.by ?? "?"} ${typeof paused.at === "number" ? `${duration(serverNow() - paused.at)} ago` : ""}`,
        paused.reason ? `: ${paused.reason}` : "") : null,
      h("dl", {class: "meta"},
        h("dt", {}, "owner"), h("dd", {}, agent.owner ?? "—"),
        h("dt", {}, "purpose"), h("dd", {}, agent.purpose ?? "—"),
        h("dt", {}, "pending"), h("dd", {},
          pending ? h("a", {href: "#approvals", class: "pending-link"}, `${pending} approval${pending === 1 ? "" : "s"} waiting`)
            : h("span", {class: "muted"}, "none"))),
      h("h3", {}, "Grants"), grantsTable(agent.grants),
      limits(agent),
    ];
  }

  function openForm(card, kind) {
    const reason = h("textarea", {name: "reason", rows: "2", required: kind === "pause", maxlength: "2000",
      placeholder: kind === "pause" ? "Why stop this agent? (required)" : "Why is it safe again? (optional)"});
    const problem = h("p", {class: "form-error", role: "alert", hidden: true});
    const submit = h("button", {type: "submit", class: `btn ${kind === "pause" ? "deny" : "approve"}`},
      kind === "pause" ? `Pause ${card.agent.id}` : `Resume ${card.agent.id}`);
    const close = () => {
      card.slot.replaceChildren();
      card.el.querySelector(".card-head button")?.focus();
    };
    const form = h("form", {class: "decide", "aria-label": `${kind} ${card.agent.id}`},
      h("label", {class: "grow"}, h("span", {}, "Reason"), reason),
      h("div", {class: "form-buttons"}, submit, h("button", {type: "button", class: "btn", onclick: close}, "Cancel")),
      problem);
    form.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        event.stopPropagation();
        close();
      } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.target.tagName !== "BUTTON") {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = reason.value.trim();
      if (kind === "pause" && !text) {
        problem.textContent = "A reason is required to pause an agent.";
        problem.hidden = false;
        return;
      }
      submit.disabled = true;
      try {
        const agent = await api(`/agents/${encodeURIComponent(card.agent.id)}/${kind}`,
          {method: "POST", body: text ? {reason: text} : {}});
        ctx.toast(`${card.agent.id} ${kind === "pause" ? "paused" : "resumed"}`, kind === "pause" ? "bad" : "ok");
        card.slot.replaceChildren();
        if (agent && agent.id) {
          card.sig = JSON.stringify(agent);
          card.agent = agent;
          fill(card.body, cardBody(card, agent));
        }
        poller.now();
      } catch (err) {
        if (err.status === 401) return;
        problem.textContent = err.status === 403 ? `Refused: ${err.message}` : `${err.message} (HTTP ${err.status || "—"})`;
        problem.hidden = false;
        submit.disabled = false;
      }
    });
    card.slot.replaceChildren(form);
    reason.focus();
  }

  return {
    show: () => poller.start(),
    hide: () => poller.stop(),
    stop() {
      poller.stop();
      cards.clear();
      grid.replaceChildren();
    },
  };
}
