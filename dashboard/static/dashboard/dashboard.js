/*
 * RouterPanel's fleet dashboard: renders the payload of /dashboard/data and keeps it live from the
 * WebSocket /ws/dashboard/ (the payload once, then what changed every second), falling back to
 * polling while the socket is down.
 *
 * Rows and cards are keyed by id and updated in place (text only, never innerHTML with data), so
 * keyboard focus and screen-reader position survive the updates; changes of health, state and
 * breaker are announced through a polite live region.
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("rp-config").textContent);
  const choices = config.choices;
  const nodesBody = document.querySelector("#rp-nodes tbody");
  const cpBody = document.querySelector("#rp-control-planes tbody");
  const modelsList = document.getElementById("rp-models");
  const connection = document.getElementById("rp-connection");
  const updated = document.getElementById("rp-updated");
  const announcer = document.getElementById("rp-announcer");
  const liveNote = document.getElementById("rp-live-note");

  const rows = new Map(); // node id -> <tr>
  const charts = new Map(); // node id -> uPlot
  const cards = new Map(); // model name -> <li>
  const cpRows = new Map(); // control plane id -> <tr>
  const previous = new Map(); // node id -> "state/health/breaker" last seen
  let updates = 0;

  const { el, paint } = window.RouterPanelUI;
  const describe = window.RouterPanelUI.describer(choices);

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setBadge(cell, kind, value) {
    const key = value === null || value === undefined ? "" : String(value);
    if (cell.dataset.value === key && cell.firstChild) return;
    cell.dataset.value = key;
    cell.replaceChildren();
    if (!key) {
      cell.appendChild(el("span", { class: "rp-muted", title: "Not known" }, "—"));
      return;
    }
    const info = describe(kind, key);
    const badge = el("span", { class: "rp-badge" }, info.label);
    paint(badge, info.colour);
    cell.appendChild(badge);
  }

  const dash = "—";
  const fmt = {
    int: (v) => (v === null || v === undefined ? dash : String(v)),
    rate: (v) => (v === null || v === undefined ? dash : v.toFixed(1)),
    percent: (v) => (v === null || v === undefined ? dash : (v * 100).toFixed(1) + " %"),
    ms: (v) => (v === null || v === undefined ? dash : v < 1 ? (v * 1000).toFixed(1) + " ms" : v.toFixed(2) + " s"),
  };

  function newNodeRow(node) {
    const tr = el("tr", { id: "node-row-" + node.id, "data-node-id": String(node.id) });
    const head = el("th", { scope: "row" });
    const link = el("a", { href: node.admin_url, "data-field": "name" });
    head.appendChild(link);
    head.appendChild(el("span", { class: "rp-node-sub", "data-field": "sub" }));
    tr.appendChild(head);
    for (const field of ["role", "state", "health", "breaker"]) tr.appendChild(el("td", { "data-field": field }));
    for (const field of ["inflight", "rps", "error_rate", "p50_latency", "p50_ttft"]) {
      tr.appendChild(el("td", { class: "rp-num", "data-field": field }));
    }
    const chartCell = el("td", { "data-field": "chart" });
    const chartBox = el("div", { class: "rp-spark", role: "img", "aria-label": "No traffic yet" });
    chartCell.appendChild(chartBox);
    tr.appendChild(chartCell);
    return tr;
  }

  function cell(tr, field) {
    return tr.querySelector('[data-field="' + field + '"]');
  }

  function drawChart(node, tr) {
    const box = cell(tr, "chart").firstChild;
    const history = (node.live && node.live.history) || [];
    const total = history.reduce((a, b) => a + b, 0);
    const peak = history.reduce((a, b) => Math.max(a, b), 0);
    box.setAttribute(
      "aria-label",
      total ? "Requests per second over the last " + history.length + " s: peak " + peak + ", total " + total : "No traffic in the last " + history.length + " s"
    );
    if (typeof window.uPlot !== "function" || !history.length) return;
    const end = Math.floor(Date.now() / 1000);
    const xs = history.map((_, i) => end - history.length + i);
    const data = [xs, history];
    let chart = charts.get(node.id);
    if (!chart) {
      chart = new window.uPlot(
        {
          width: 150,
          height: 36,
          legend: { show: false },
          cursor: { show: false },
          select: { show: false },
          axes: [{ show: false }, { show: false }],
          scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
          series: [{}, { stroke: "#0969da", fill: "rgba(9, 105, 218, 0.15)", width: 1.5, points: { show: false } }],
        },
        data,
        box
      );
      charts.set(node.id, chart);
    } else {
      chart.setData(data);
    }
  }

  function announce(message) {
    const item = el("p", {}, message);
    announcer.appendChild(item);
    while (announcer.childNodes.length > 5) announcer.removeChild(announcer.firstChild);
  }

  function renderNode(node) {
    let tr = rows.get(node.id);
    if (!tr) {
      tr = newNodeRow(node);
      rows.set(node.id, tr);
    }
    const live = node.live;
    setText(cell(tr, "name"), node.name || node.url);
    setText(cell(tr, "sub"), [node.name ? node.url : "", choices_label("engine", node.engine_type), node.models.join(", ")].filter(Boolean).join(" · "));
    setBadge(cell(tr, "role"), "role", node.role);
    setBadge(cell(tr, "state"), "state", node.state);
    setBadge(cell(tr, "health"), "health", node.health);
    setBadge(cell(tr, "breaker"), "breaker", node.breaker);
    setText(cell(tr, "inflight"), live ? fmt.int(live.inflight) : "0");
    setText(cell(tr, "rps"), live ? fmt.rate(live.rps) : dash);
    setText(cell(tr, "error_rate"), live ? fmt.percent(live.error_rate) : dash);
    setText(cell(tr, "p50_latency"), live ? fmt.ms(live.p50_latency) : dash);
    setText(cell(tr, "p50_ttft"), live ? fmt.ms(live.p50_ttft) : dash);
    tr.dataset.requests = live ? String(live.requests) : "0";
    tr.dataset.health = node.health;
    tr.dataset.state = node.state;
    drawChart(node, tr);

    const status = node.state + "/" + node.health + "/" + (node.breaker || "");
    const before = previous.get(node.id);
    if (before !== undefined && before !== status) {
      announce((node.name || node.url) + ": " + describe("state", node.state).label + ", " + describe("health", node.health).label + (node.breaker ? ", breaker " + describe("breaker", node.breaker).label : ""));
    }
    previous.set(node.id, status);
  }

  // Puts the rows in ``order`` (node ids) and drops the rows of nodes no longer listed.
  function placeNodes(order) {
    const seen = new Set(order);
    order.forEach((id, index) => {
      const tr = rows.get(id);
      if (tr && nodesBody.children[index] !== tr) nodesBody.insertBefore(tr, nodesBody.children[index] || null);
    });
    for (const [id, tr] of rows) {
      if (seen.has(id)) continue;
      const chart = charts.get(id);
      if (chart) chart.destroy();
      charts.delete(id);
      tr.remove();
      rows.delete(id);
      previous.delete(id);
      shown.delete(id);
    }
    document.getElementById("rp-nodes-empty").hidden = order.length > 0;
  }

  function choices_label(kind, value) {
    return kind === "engine" ? value : describe(kind, value).label;
  }

  function renderModels(models, nodesById) {
    const seen = new Set();
    models.forEach((model, index) => {
      seen.add(model.name);
      const members = model.nodes.map((id) => nodesById.get(id)).filter(Boolean);
      const signature = JSON.stringify([model, members.map((n) => [n.id, n.url, n.name, n.role, n.state, n.health, n.breaker])]);
      let li = cards.get(model.name);
      if (!li) {
        li = el("li", { class: "rp-card", "data-model": model.name });
        cards.set(model.name, li);
      }
      if (modelsList.children[index] !== li) modelsList.insertBefore(li, modelsList.children[index] || null);
      if (li.dataset.signature === signature) return;
      li.dataset.signature = signature;
      li.dataset.ready = model.ready ? "true" : "false";
      li.replaceChildren();
      const headingId = "model-" + index + "-heading";
      li.setAttribute("aria-labelledby", headingId);
      const heading = el("h3", { id: headingId });
      heading.appendChild(el("span", {}, model.name));
      const readiness = el("span", { class: "rp-badge", "data-field": "readiness" }, model.ready ? "Ready" : "Not ready");
      paint(readiness, model.ready ? "#1a7f37" : "#cf222e");
      heading.appendChild(readiness);
      li.appendChild(heading);
      const dl = el("dl");
      dl.appendChild(el("dt", {}, "Strategy"));
      dl.appendChild(el("dd", {}, describe("strategy", model.strategy).label));
      dl.appendChild(el("dt", {}, "Serving"));
      const mode = describe("serving_mode", model.serving_mode).label;
      const effective = describe("serving_mode", model.effective_mode).label;
      dl.appendChild(el("dd", {}, model.serving_mode === "auto" ? mode + " → " + effective : mode));
      dl.appendChild(el("dt", {}, "Nodes"));
      const dd = el("dd");
      const list = el("ul", { class: "rp-card-nodes" });
      for (const node of members) {
        const item = el("li");
        item.appendChild(el("span", {}, (node.name || node.url) + " "));
        for (const [kind, value] of [["role", node.role], ["health", node.health]]) {
          const info = describe(kind, value);
          const badge = el("span", { class: "rp-badge" }, info.label);
          paint(badge, info.colour);
          item.appendChild(badge);
          item.appendChild(document.createTextNode(" "));
        }
        if (node.state !== "active") {
          const info = describe("state", node.state);
          const badge = el("span", { class: "rp-badge" }, info.label);
          paint(badge, info.colour);
          item.appendChild(badge);
          item.appendChild(document.createTextNode(" "));
        }
        if (node.breaker && node.breaker !== "closed") {
          const info = describe("breaker", node.breaker);
          const badge = el("span", { class: "rp-badge" }, "Breaker " + info.label.toLowerCase());
          paint(badge, info.colour);
          item.appendChild(badge);
        }
        list.appendChild(item);
      }
      dd.appendChild(list);
      dl.appendChild(dd);
      li.appendChild(dl);
      if (model.reasons.length) li.appendChild(el("p", { class: "rp-reasons" }, "Not ready: " + model.reasons.join("; ") + "."));
      if (model.panic_notes.length) li.appendChild(el("p", { class: "rp-panic", "data-field": "panic" }, model.panic_notes.join("; ") + "."));
    });
    for (const [name, li] of cards) {
      if (!seen.has(name)) {
        li.remove();
        cards.delete(name);
      }
    }
    document.getElementById("rp-models-empty").hidden = models.length > 0;
  }

  function renderControlPlanes(planes) {
    const seen = new Set();
    planes.forEach((cp, index) => {
      seen.add(cp.id);
      let tr = cpRows.get(cp.id);
      if (!tr) {
        tr = el("tr", { id: "cp-row-" + cp.id });
        const head = el("th", { scope: "row" });
        head.appendChild(el("a", { href: cp.admin_url, "data-field": "name" }));
        tr.appendChild(head);
        for (const field of ["address", "scope", "sync_state", "last_sync_at"]) tr.appendChild(el("td", { "data-field": field }));
        for (const field of ["duration", "nodes"]) tr.appendChild(el("td", { class: "rp-num", "data-field": field }));
        tr.appendChild(el("td", { "data-field": "error" }));
        cpRows.set(cp.id, tr);
      }
      if (cpBody.children[index] !== tr) cpBody.insertBefore(tr, cpBody.children[index] || null);
      setText(cell(tr, "name"), cp.name + (cp.enabled ? "" : " (disabled)"));
      setText(cell(tr, "address"), cp.address);
      setText(cell(tr, "scope"), cp.scope || dash);
      setBadge(cell(tr, "sync_state"), "sync_state", cp.sync_state);
      setText(cell(tr, "last_sync_at"), cp.last_sync_at ? new Date(cp.last_sync_at).toLocaleString() : "never");
      setText(cell(tr, "duration"), cp.last_sync_duration_ms === null ? dash : cp.last_sync_duration_ms + " ms");
      setText(cell(tr, "nodes"), String(cp.nodes));
      setText(cell(tr, "error"), cp.last_sync_error || "");
    });
    for (const [id, tr] of cpRows) {
      if (!seen.has(id)) {
        tr.remove();
        cpRows.delete(id);
      }
    }
    document.getElementById("rp-cp-empty").hidden = planes.length > 0;
  }

  // What the page shows, kept to apply the WebSocket's updates to (``dashboard/payload.py``: the
  // whole payload first, then every second the nodes that changed, their history as its new seconds).
  const shown = new Map(); // node id -> node
  let models = [];

  function finish(payload) {
    liveNote.hidden = payload.live;
    if (updates === 0) performance.mark("rp-drawn"); // the first table drawn (tests time it)
    updates += 1;
    document.body.dataset.updates = String(updates);
    setText(updated, "Updated " + new Date(payload.generated_at).toLocaleTimeString());
  }

  function render(payload) {
    shown.clear();
    for (const node of payload.nodes) {
      shown.set(node.id, node);
      renderNode(node);
    }
    placeNodes(payload.nodes.map((n) => n.id));
    models = payload.models;
    renderModels(models, shown);
    renderControlPlanes(payload.control_planes);
    finish(payload);
  }

  function withHistory(node) {
    const live = node.live;
    if (!live || live.history_shift === undefined) return node;
    const before = shown.get(node.id);
    const old = (before && before.live && before.live.history) || [];
    const { history_shift: shift, history_new: added, ...figures } = live;
    return { ...node, live: { ...figures, history: old.slice(shift).concat(added) } };
  }

  function apply(update) {
    for (const change of update.nodes) {
      const node = withHistory(change);
      shown.set(node.id, node);
      renderNode(node);
    }
    if (update.order) placeNodes(update.order);
    if (update.models || update.model_order) {
      const cardsByName = new Map(models.map((m) => [m.name, m]));
      for (const card of update.models || []) cardsByName.set(card.name, card);
      models = (update.model_order || models.map((m) => m.name)).map((name) => cardsByName.get(name)).filter(Boolean);
    }
    if (update.models || update.model_order || update.nodes.length) renderModels(models, shown);
    if (update.control_planes) renderControlPlanes(update.control_planes);
    finish(update);
  }

  function receive(message) {
    if (message.type === "update") apply(message);
    else render(message);
  }

  function setConnection(state, text) {
    connection.dataset.state = state;
    setText(connection, text);
  }

  // -- Transport: WebSocket first, polling while it is down -------------------------------------

  let socket = null;
  let pollTimer = null;
  let retryDelay = 1000;

  function poll() {
    fetch(config.data_path, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((response) => {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then((payload) => {
        render(payload);
        if (!socket || socket.readyState !== WebSocket.OPEN) setConnection("polling", "Polling (live connection down)");
      })
      .catch(() => setConnection("offline", "Offline: retrying"));
  }

  function startPolling() {
    if (pollTimer === null) pollTimer = window.setInterval(poll, config.refresh_seconds * 1000);
  }

  function stopPolling() {
    if (pollTimer !== null) window.clearInterval(pollTimer);
    pollTimer = null;
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + config.websocket_path);
    socket.addEventListener("open", () => {
      retryDelay = 1000;
      stopPolling();
      setConnection("live", "Live");
    });
    socket.addEventListener("message", (event) => {
      try {
        receive(JSON.parse(event.data));
      } catch (error) {
        console.error("dashboard update failed", error);
      }
    });
    socket.addEventListener("close", () => {
      setConnection("polling", "Polling (live connection down)");
      startPolling();
      window.setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    });
  }

  render(JSON.parse(document.getElementById("rp-initial").textContent));
  if ("WebSocket" in window) connect();
  else startPolling();
})();
