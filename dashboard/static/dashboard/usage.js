/*
 * The dashboard's usage chart: tokens (prompt + completion) per minute per model over the last
 * hour, from /dashboard/usage (the web workers' live minutes, docs/usage.md), drawn with the
 * vendored uPlot and refreshed every 15 s. Under it, each model's total for the hour as text, for
 * screen readers and for reading exact figures.
 */
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("rp-config").textContent);
  const box = document.getElementById("rp-usage-chart");
  const totals = document.getElementById("rp-usage-totals");
  const empty = document.getElementById("rp-usage-empty");
  const unavailable = document.getElementById("rp-usage-unavailable");
  const { el } = window.RouterPanelUI;
  const COLOURS = ["#0969da", "#1a7f37", "#bc4c00", "#8250df", "#cf222e", "#4d2d00", "#1b7c83", "#6e7781"];
  const REFRESH_MS = 15000;
  let chart = null;
  let shown = "";

  function render(payload) {
    unavailable.hidden = !payload.unavailable;
    const series = payload.series || [];
    empty.hidden = series.length > 0 || payload.unavailable;
    box.hidden = series.length === 0;
    totals.replaceChildren(
      ...series.map((s) => el("li", {}, `${s.model}: ${s.tokens.reduce((a, b) => a + b, 0).toLocaleString()} tokens`))
    );
    if (!series.length || typeof window.uPlot !== "function") return;
    const xs = series[0].tokens.map((_, i) => (payload.start_minute + i) * 60);
    const data = [xs, ...series.map((s) => s.tokens)];
    const models = series.map((s) => s.model).join("\n");
    if (chart && models === shown) {
      chart.setData(data);
      return;
    }
    if (chart) chart.destroy();
    shown = models;
    chart = new window.uPlot(
      {
        width: Math.min(900, Math.max(320, box.clientWidth || 640)),
        height: 220,
        scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        series: [
          {},
          ...series.map((s, i) => ({
            label: s.model,
            stroke: COLOURS[i % COLOURS.length],
            width: 1.5,
            points: { show: false },
          })),
        ],
      },
      data,
      box
    );
  }

  async function refresh() {
    try {
      const response = await fetch(config.usage_path, { credentials: "same-origin" });
      if (response.ok) render(await response.json());
    } catch (error) {
      // the next refresh tries again; the live figures above say when the server is away
    }
  }

  refresh();
  window.setInterval(refresh, REFRESH_MS);
})();
