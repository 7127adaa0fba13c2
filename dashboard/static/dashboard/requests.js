/*
 * RouterPanel's Requests page: the request explanations of /api/requests/, newest first. The first
 * page comes with the HTML (#rp-initial); the WebSocket /ws/requests/ adds the requests that arrive
 * after it (the live tail) while the page shows the newest records. Choosing a request shows its
 * whole record: the router's choices with their candidates and the nodes left out and why, every
 * attempt with its status, timing and the reason for its retry, the PD pair, and the token usage.
 *
 * Everything is built with text nodes (never innerHTML with data); labels and badge colours come
 * from the server (nodes/choices.py).
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("rp-config").textContent);
  const initial = JSON.parse(document.getElementById("rp-initial").textContent);
  const choices = config.choices;
  const body = document.querySelector("#rp-requests tbody");
  const empty = document.getElementById("rp-requests-empty");
  const connection = document.getElementById("rp-connection");
  const announcer = document.getElementById("rp-announcer");
  const detail = document.getElementById("rp-detail");
  const detailHeading = document.getElementById("rp-detail-heading");
  const detailBody = document.getElementById("rp-detail-body");

  const MAX_ROWS = 200;
  const records = new Map(); // request entry -> record
  let selectedEntry = null;

  const { el, paint } = window.RouterPanelUI;
  const describe = window.RouterPanelUI.describer(choices);

  function badge(kind, value, text) {
    const info = describe(kind, value);
    const span = el("span", { class: "rp-badge", "data-value": value }, text || info.label);
    paint(span, info.colour);
    return span;
  }

  function statusBadge(record) {
    const status = record.status;
    const kind = status === 0 ? "none" : String(status)[0] + "xx";
    const span = el("span", { class: "rp-status rp-status-" + kind, "data-status": String(status) }, status ? String(status) : "—");
    if (record.error) span.setAttribute("title", record.error);
    return span;
  }

  const dash = "—";
  function ms(value) {
    if (value === null || value === undefined) return dash;
    return value < 1000 ? value.toFixed(1) + " ms" : (value / 1000).toFixed(2) + " s";
  }

  function nodeLabel(ref) {
    if (!ref) return dash;
    const known = config.nodes[String(ref.node)];
    return known || ref.url;
  }

  function servedBy(record) {
    if (record.pair) return "prefill " + nodeLabel(record.pair.prefill) + " → decode " + nodeLabel(record.pair.decode);
    return nodeLabel(record.node);
  }

  // The nodes left out of the request's first choice of each role, by reason ("draining 1, ...").
  function leftOut(record) {
    const counts = new Map();
    const seen = new Set();
    for (const choice of record.choices) {
      if (seen.has(choice.role)) continue; // a retry's choice repeats them, plus the node just tried
      seen.add(choice.role);
      for (const exclusion of choice.excluded) counts.set(exclusion.reason, (counts.get(exclusion.reason) || 0) + exclusion.count);
    }
    return Array.from(counts, ([reason, count]) => describe("reason", reason).label.toLowerCase() + " " + count);
  }

  function tokens(record) {
    const usage = record.usage;
    if (!usage) return dash;
    if (usage.total_tokens !== null) return String(usage.total_tokens);
    return String((usage.prompt_tokens || 0) + (usage.completion_tokens || 0));
  }

  function time(record) {
    const at = new Date(record.at);
    return at.toLocaleTimeString([], { hour12: false }) + "." + String(at.getMilliseconds()).padStart(3, "0");
  }

  // -- The table ---------------------------------------------------------------------------------

  function row(record) {
    const tr = el("tr", { "data-entry": record.entry, "data-request-id": record.id, "data-status": String(record.status) });
    tr.appendChild(el("td", { class: "rp-nowrap", title: record.at }, time(record)));
    const head = el("th", { scope: "row" });
    const open = el("button", { type: "button", class: "rp-link", "aria-controls": "rp-detail" }, record.id);
    open.addEventListener("click", () => select(record.entry, true));
    head.appendChild(open);
    tr.appendChild(head);
    tr.appendChild(el("td", {}, record.model));
    tr.appendChild(el("td", {}, record.key || dash));
    tr.appendChild(el("td", { "data-field": "node" }, servedBy(record)));
    const status = el("td", { "data-field": "status" });
    status.appendChild(statusBadge(record));
    if (record.error) status.appendChild(el("span", { class: "rp-node-sub" }, record.error));
    tr.appendChild(status);
    tr.appendChild(el("td", { class: "rp-num", "data-field": "retries" }, String(record.retries)));
    const out = leftOut(record);
    tr.appendChild(el("td", { "data-field": "left_out" }, out.length ? out.join(", ") : dash));
    tr.appendChild(el("td", { class: "rp-num" }, ms(record.ttfb_ms)));
    tr.appendChild(el("td", { class: "rp-num" }, ms(record.total_ms)));
    tr.appendChild(el("td", { class: "rp-num" }, tokens(record)));
    tr.addEventListener("click", (event) => {
      if (event.target === open) return;
      select(record.entry, false);
    });
    return tr;
  }

  function add(list, atTop) {
    const rows = list.filter((record) => !records.has(record.entry)).map((record) => {
      records.set(record.entry, record);
      const tr = row(record);
      if (atTop) tr.classList.add("rp-new");
      return tr;
    });
    if (atTop) {
      for (const tr of rows) body.insertBefore(tr, body.firstChild); // oldest first: the newest ends on top
    } else {
      for (const tr of rows) body.appendChild(tr);
    }
    while (body.children.length > MAX_ROWS) {
      const last = body.lastChild;
      if (last.dataset.entry === selectedEntry) break;
      records.delete(last.dataset.entry);
      last.remove();
    }
    empty.hidden = body.children.length > 0;
    return rows.length;
  }

  // -- One request in full -----------------------------------------------------------------------

  function dl(pairs) {
    const list = el("dl", { class: "rp-facts" });
    for (const [term, value] of pairs) {
      list.appendChild(el("dt", {}, term));
      const dd = el("dd");
      if (value instanceof Node) dd.appendChild(value);
      else dd.textContent = value === null || value === undefined || value === "" ? dash : String(value);
      list.appendChild(dd);
    }
    return list;
  }

  function table(caption, headers, rows, attrs) {
    const wrapper = el("div", { class: "rp-scroll" });
    const t = el("table", Object.assign({ class: "rp-table rp-detail-table" }, attrs || {}));
    t.appendChild(el("caption", {}, caption));
    const head = el("tr");
    for (const name of headers) head.appendChild(el("th", { scope: "col" }, name));
    const thead = el("thead");
    thead.appendChild(head);
    t.appendChild(thead);
    const tbody = el("tbody");
    for (const cells of rows) {
      const tr = el("tr");
      cells.forEach((cell, i) => {
        const td = el(i === 0 ? "th" : "td", i === 0 ? { scope: "row" } : {});
        if (cell instanceof Node) td.appendChild(cell);
        else td.textContent = cell === null || cell === undefined ? dash : String(cell);
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    }
    t.appendChild(tbody);
    wrapper.appendChild(t);
    return wrapper;
  }

  function outcome(record) {
    const p = el("p", { class: "rp-outcome", "data-field": "outcome" });
    p.appendChild(statusBadge(record));
    let text;
    if (record.status >= 200 && record.status < 400 && !record.error) {
      text = " Answered by " + servedBy(record);
    } else {
      text = " Failed" + (record.error ? " (" + record.error + ")" : "");
      if (record.attempts.length) text += " after " + record.attempts.length + " attempt" + (record.attempts.length > 1 ? "s" : "");
    }
    if (record.retries) text += ", " + record.retries + " retr" + (record.retries > 1 ? "ies" : "y");
    p.appendChild(document.createTextNode(text + "."));
    if (record.message) p.appendChild(el("span", { class: "rp-message", "data-field": "message" }, record.message));
    return p;
  }

  function attemptOutcome(attempt) {
    if (attempt.error) return attempt.error + (attempt.status ? " (" + attempt.status + ")" : "");
    if (!attempt.status) return dash;
    const brokeOff = attempt.status < 300 && attempt.verdict === false; // a stream the engine broke
    return String(attempt.status) + (brokeOff ? ", broke off mid-stream" : "");
  }

  function retryReason(reason) {
    if (!reason) return "first try";
    return /^[0-9]+$/.test(reason) ? "the previous node answered " + reason : "the previous node: " + reason;
  }

  function renderDetail(record) {
    detailHeading.textContent = "Request " + record.id;
    detail.dataset.requestId = record.id;
    detailBody.replaceChildren();
    detailBody.appendChild(outcome(record));
    const usage = record.usage
      ? [record.usage.prompt_tokens, record.usage.completion_tokens, record.usage.total_tokens].map((v) => (v === null ? dash : v)).join(" / ")
      : "not in the answer";
    detailBody.appendChild(
      dl([
        ["Arrived", new Date(record.at).toLocaleString() + " (" + record.at + ")"],
        ["Model", record.model + (record.mode ? " · " + describe("serving_mode", record.mode).label : "")],
        ["Path", record.path + (record.stream ? " (stream)" : "")],
        ["API key", record.key],
        ["Policy", record.policy === null ? dash : record.policy === "" ? "default policy" : "policy of " + record.policy],
        ["Strategy", record.strategy ? describe("strategy", record.strategy).label : dash],
        [record.status >= 200 && record.status < 400 && !record.error ? "Served by" : "Answer from", servedBy(record)],
        ["First byte", ms(record.ttfb_ms)],
        ["Total", ms(record.total_ms)],
        ["Tokens (prompt / completion / total)", usage],
      ])
    );

    detailBody.appendChild(el("h3", {}, "How the router chose"));
    if (!record.choices.length) detailBody.appendChild(el("p", { class: "rp-muted" }, "It never got to choosing a node."));
    record.choices.forEach((choice, index) => {
      const section = el("div", { class: "rp-choice", "data-role": choice.role, "data-index": String(index) });
      const title = el("h4", {});
      title.appendChild(badge("role", choice.role));
      const picked = choice.pick ? "picked " + nodeLabel(choice.pick) : "no node could take it";
      title.appendChild(
        document.createTextNode(
          " Choice " + (index + 1) + ": " + picked + " — " + choice.available + " of " + choice.in_rotation + " in rotation available"
        )
      );
      section.appendChild(title);
      if (choice.candidates.length) {
        section.appendChild(
          table(
            "Candidates (the pick first) with the figures the strategy read",
            ["Node", "In flight", "Weight", "Latency", "Prefix match"],
            choice.candidates.map((c) => [
              nodeLabel(c) + (choice.pick && c.node === choice.pick.node ? " (picked)" : ""),
              c.inflight,
              c.weight,
              ms(c.latency_ms),
              c.prefix_match === null ? dash : c.prefix_match + " chars",
            ])
          )
        );
      }
      if (choice.excluded.length) {
        const list = el("ul", { class: "rp-excluded", "aria-label": "Nodes left out of choice " + (index + 1) });
        for (const exclusion of choice.excluded) {
          const item = el("li", { "data-reason": exclusion.reason });
          item.appendChild(badge("reason", exclusion.reason));
          const names = exclusion.nodes.map(nodeLabel);
          const more = exclusion.count - names.length;
          item.appendChild(document.createTextNode(" " + names.join(", ") + (more > 0 ? " and " + more + " more" : "")));
          list.appendChild(item);
        }
        section.appendChild(el("p", { class: "rp-subhead" }, "Left out:"));
        section.appendChild(list);
      }
      detailBody.appendChild(section);
    });

    detailBody.appendChild(el("h3", {}, "Attempts"));
    if (!record.attempts.length) {
      detailBody.appendChild(el("p", { class: "rp-muted" }, "No node was tried."));
    } else {
      detailBody.appendChild(
        table(
          "Each try on a node, in order (PD: each leg)",
          ["#", "Role", "Node", "Started", "Took", "Outcome", "First chunk", "Why tried"],
          record.attempts.map((a, i) => [
            String(i + 1),
            badge("role", a.role),
            nodeLabel(a),
            "+" + ms(a.started_ms),
            ms(a.duration_ms),
            attemptOutcome(a),
            ms(a.ttft_ms),
            retryReason(a.retry),
          ]),
          { id: "rp-attempts" }
        )
      );
    }
    detail.hidden = false;
  }

  function select(entry, focus) {
    const record = records.get(entry);
    if (!record) return;
    selectedEntry = entry;
    for (const tr of body.children) {
      if (tr.dataset.entry === entry) tr.setAttribute("aria-current", "true");
      else tr.removeAttribute("aria-current");
    }
    renderDetail(record);
    const url = new URL(window.location.href);
    url.searchParams.set("request", record.id);
    window.history.replaceState(null, "", url);
    if (focus) detailHeading.focus();
  }

  // -- Live tail ---------------------------------------------------------------------------------

  function setConnection(state, text) {
    connection.dataset.state = state;
    if (connection.textContent !== text) connection.textContent = text;
  }

  let retryDelay = 1000;
  let newest = config.newest_entry;

  function follow() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + window.location.host + config.websocket_path);
    socket.addEventListener("open", () => {
      retryDelay = 1000;
      socket.send(JSON.stringify({ type: "follow", after: newest, filters: config.tail_filters }));
      setConnection("live", "Live: new requests appear at the top");
    });
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "records") {
        if (message.records.length) newest = message.records[message.records.length - 1].entry;
        const added = add(message.records, true);
        if (added) announcer.textContent = added + " new request" + (added > 1 ? "s" : "");
        document.body.dataset.tailUpdates = String(Number(document.body.dataset.tailUpdates || 0) + 1);
      } else if (message.type === "status") {
        if (message.live) setConnection("live", "Live: new requests appear at the top");
        else setConnection("offline", "Live tail paused: Redis unreachable");
      }
    });
    socket.addEventListener("close", () => {
      setConnection("offline", "Live tail disconnected: reconnecting");
      window.setTimeout(follow, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    });
  }

  add(initial.records, false);
  if (initial.selected) {
    if (!records.has(initial.selected.entry)) records.set(initial.selected.entry, initial.selected);
    select(initial.selected.entry, false);
  }
  empty.hidden = body.children.length > 0;
  if (config.tail && "WebSocket" in window) follow();
})();
