// The usage chart: one stacked bar per day, a segment per key, drawn as SVG (text labels, a
// <title> per segment for the pointer and screen readers), and the same numbers as CSV.

import { el, svg } from "./dom.js";

export const COUNTERS = ["requests", "errors", "jobs_succeeded", "jobs_failed", "images", "video_seconds",
  "gpu_seconds", "steps"];
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac"];

/** Every UTC day from `start` to `end` (YYYY-MM-DD), both included. */
export function daysBetween(start, end) {
  const days = [];
  for (let day = new Date(`${start}T00:00:00Z`); day <= new Date(`${end}T00:00:00Z`); day.setUTCDate(day.getUTCDate() + 1)) {
    days.push(day.toISOString().slice(0, 10));
  }
  return days;
}

export function colorOf(index) {
  return PALETTE[index % PALETTE.length];
}

/** The chart of `metric` per day and key, from the usage endpoint's answer (with by_day). */
export function usageChart(usage, metric) {
  const days = daysBetween(usage.start_date, usage.end_date);
  const keys = usage.keys.map((k) => k.key_id);
  const value = (key, day) => Number(usage.keys[keys.indexOf(key)].days?.[day]?.[metric] || 0);
  const totals = days.map((day) => keys.reduce((sum, key) => sum + value(key, day), 0));
  const top = niceCeiling(Math.max(...totals, 0));
  const width = 720;
  const height = 260;
  const left = 48;
  const bottom = 40;
  const plot = height - bottom - 12;
  const step = (width - left - 8) / Math.max(1, days.length);
  const bar = Math.min(48, Math.max(2, step * 0.7));
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": `${metric} per day and key, ${usage.start_date} to ${usage.end_date}` });
  for (const fraction of [0, 0.5, 1]) {
    const y = 12 + plot * (1 - fraction);
    chart.append(svg("line", { x1: left, x2: width - 4, y1: y, y2: y, class: "grid" }),
      svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "axis" }, formatNumber(top * fraction)));
  }
  days.forEach((day, i) => {
    const x = left + i * step + (step - bar) / 2;
    let y = 12 + plot;
    keys.forEach((key, k) => {
      const count = value(key, day);
      if (!count) return;
      const h = (count / top) * plot;
      y -= h;
      chart.append(svg("rect", { x, y, width: bar, height: Math.max(h, 1), fill: colorOf(k), class: "bar",
        dataset: { key, day, value: String(count) } }, svg("title", {}, `${day} ${key}: ${formatNumber(count)} ${metric}`)));
    });
    const every = Math.ceil(days.length / 10);
    if (i % every === 0 || i === days.length - 1) {
      chart.append(svg("text", { x: x + bar / 2, y: height - bottom + 16, "text-anchor": "middle", class: "axis" },
        day.slice(5)));
    }
  });
  const legend = el("ul", { class: "legend" }, keys.map((key, k) => el("li", {},
    el("span", { class: "swatch", dataset: { color: colorOf(k) } }), key)));
  for (const swatch of legend.querySelectorAll(".swatch")) swatch.style.background = swatch.dataset.color;
  return el("figure", { class: "usage-figure" }, chart, legend);
}

/** The smallest 1, 2 or 5 times a power of ten at or above `n` (at least 1): the chart's top. */
function niceCeiling(n) {
  if (n <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(n));
  return [1, 2, 5, 10].map((m) => m * power).find((v) => v >= n);
}

export function formatNumber(n) {
  return String(Number(Number(n).toFixed(2)));
}

/** The usage as CSV: one row per key and day, every counter. */
export function usageCsv(usage) {
  const rows = [["key_id", "day", ...COUNTERS].join(",")];
  for (const key of usage.keys) {
    for (const [day, counts] of Object.entries(key.days || {}).sort()) {
      rows.push([key.key_id, day, ...COUNTERS.map((c) => counts[c] ?? 0)].join(","));
    }
  }
  return `${rows.join("\n")}\n`;
}
