/*
 * What the dashboard and the Requests page share: building elements from text (never innerHTML
 * with data), the labels and badge colours the server sends (nodes/choices.py), and painting a
 * badge with whichever text colour, white or near-black, contrasts more with it (WCAG relative
 * luminance: a light badge colour such as the draining amber would fail AA with white text).
 */
window.RouterPanelUI = (function () {
  "use strict";

  const DARK_TEXT = "#1f2328";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // A kind's value -> {label, colour}, from the choices the page was served with.
  function describer(choices) {
    return function describe(kind, value) {
      return (choices[kind] && choices[kind][value]) || { label: value, colour: "#6e7781" };
    };
  }

  function luminance(hex) {
    const match = /^#?([0-9a-f]{6})$/i.exec(hex || "");
    if (!match) return 0;
    const channels = [0, 2, 4].map((i) => parseInt(match[1].slice(i, i + 2), 16) / 255);
    const [r, g, b] = channels.map((c) => (c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4)));
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  const DARK_TEXT_LUMINANCE = luminance(DARK_TEXT);

  function paint(badge, colour) {
    const l = luminance(colour);
    const onWhite = 1.05 / (l + 0.05);
    const onDark = (l + 0.05) / (DARK_TEXT_LUMINANCE + 0.05);
    badge.style.backgroundColor = colour;
    badge.style.color = onWhite >= onDark ? "#ffffff" : DARK_TEXT;
  }

  return { el, describer, paint };
})();
