// A small SVG line chart: stacked panels sharing one x axis (no library).

const NS = 'http://www.w3.org/2000/svg';
export const PALETTE = ['#2563eb', '#dc2626', '#059669', '#9333ea', '#d97706', '#0891b2',
                        '#db2777', '#4b5563'];
export const STEERED = '#c2410c';
export const UNSTEERED = '#64748b';
const LOW = '#b42318';

function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

function text(parent, x, y, s, attrs = {}) {
  const t = el('text', { x, y, ...attrs }, parent);
  t.textContent = s;
  return t;
}

/** About `n` round tick values covering [a, b]. */
export function niceTicks(a, b, n = 5) {
  if (!(b > a)) return [a];
  const raw = (b - a) / Math.max(1, n);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let x = Math.ceil(a / step - 1e-9) * step; x <= b + step * 1e-9; x += step) {
    out.push(Math.abs(x) < step * 1e-9 ? 0 : Number(x.toPrecision(12)));
  }
  return out;
}

/** Decades in [a, b]; 1-2-5 steps when fewer than two decades fall inside. */
export function logTicks(a, b) {
  const decades = [];
  for (let k = Math.floor(Math.log10(a)); k <= Math.ceil(Math.log10(b)); k += 1) decades.push(k);
  const pick = (ms) => decades.flatMap((k) => ms.map((m) => Number((m * 10 ** k).toPrecision(6))))
    .filter((y) => y >= a && y <= b);
  const one = pick([1]);
  return one.length >= 2 ? one : pick([1, 2, 5]);
}

function fmt(x) {
  if (x === 0) return '0';
  const ax = Math.abs(x);
  if (ax >= 1e4 || ax < 1e-3) return x.toExponential(0);
  return String(Number(x.toPrecision(3)));
}

function extent(values, pad = 0.08) {
  const v = values.filter((x) => x !== null && Number.isFinite(x));
  if (!v.length) return [0, 1];
  let lo = Math.min(...v);
  let hi = Math.max(...v);
  if (hi === lo) { lo -= 1; hi += 1; }
  const d = (hi - lo) * pad;
  return [lo - d, hi + d];
}

/**
 * Draw `spec` into `svg` (replacing what was there).
 *
 * spec: {xLabel, xDomain?: [a, b], xTicks?: [..], vlines?: [{x, label}],
 *        legend?: [{label, color, dashed?}], empty?: string,
 *        panels: [{title, log?: bool, yDomain?: [a, b], hlines?: [{y, label}],
 *                  series: [{label, color, dashed?, faint?, markers?: bool, cls?: string,
 *                            lowBelow?: number, points: [[x, y|null, note?], ...]}]}]}
 * Each point of a series with `markers` is a <circle class="pt {cls}" data-x data-y>
 * (red when below the series' `lowBelow`); a point's `note` (e.g. what triggered a
 * reading) goes in its tooltip and its `data-note`. `bare`: no ticks (an empty chart).
 */
export function drawChart(svg, spec) {
  svg.classList.toggle('bare', !!spec.bare);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const width = Math.max(320, Math.round(svg.clientWidth || svg.parentNode.clientWidth || 640));
  const panelH = spec.panelHeight || 120;
  const gap = 44; // room for the next panel's title, above its frame
  const m = { left: 58, right: 18, top: spec.legend && spec.legend.length ? 50 : 26, bottom: 40 };
  const height = m.top + spec.panels.length * panelH + (spec.panels.length - 1) * gap + m.bottom;
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('height', String(height));
  const innerW = width - m.left - m.right;

  const allX = spec.panels.flatMap((p) => p.series.flatMap((s) => s.points.map((q) => q[0])));
  const [x0, x1] = spec.xDomain || extent(allX, 0.04);
  const sx = (x) => m.left + ((x - x0) / (x1 - x0 || 1)) * innerW;
  const xTicks = spec.bare ? [] : spec.xTicks || niceTicks(x0, x1, Math.max(3, Math.floor(innerW / 70)));

  if (spec.legend && spec.legend.length) {
    let lx = m.left;
    for (const item of spec.legend) {
      const g = el('g', { class: 'legend-item' }, svg);
      el('line', { x1: lx, x2: lx + 18, y1: 14, y2: 14, stroke: item.color, 'stroke-width': 2.5,
                   'stroke-dasharray': item.dashed ? '4 3' : 'none' }, g);
      const t = text(g, lx + 24, 18, item.label, { class: 'legend' });
      lx += 24 + Math.max(40, 7.2 * item.label.length) + 18;
      if (t && lx > width - 60) lx = width - 60; // keep it on the canvas
    }
  }

  spec.panels.forEach((panel, i) => {
    const top = m.top + i * (panelH + gap);
    const g = el('g', { class: 'panel' }, svg);
    const ys = panel.series.flatMap((s) => s.points.map((q) => q[1]))
      .concat((panel.hlines || []).map((h) => h.y));
    const log = !!panel.log;
    const usable = ys.filter((y) => y !== null && Number.isFinite(y) && (!log || y > 0));
    let [y0, y1] = panel.yDomain || (log
      ? [Math.min(...usable, 1) / 1.5, Math.max(...usable, 1e-3) * 1.5]
      : extent(usable));
    if (log && !usable.length) { y0 = 1e-3; y1 = 1; }
    const ty = (y) => (log ? Math.log10(y) : y);
    const sy = (y) => top + panelH - ((ty(y) - ty(y0)) / (ty(y1) - ty(y0) || 1)) * panelH;

    el('rect', { x: m.left, y: top, width: innerW, height: panelH, class: 'plot-bg' }, g);
    const yTicks = spec.bare ? [] : log ? logTicks(y0, y1) : niceTicks(y0, y1, 4);
    for (const y of yTicks) {
      el('line', { x1: m.left, x2: m.left + innerW, y1: sy(y), y2: sy(y), class: 'grid' }, g);
      text(g, m.left - 6, sy(y) + 4, log ? fmt(y) : fmt(y), { class: 'tick', 'text-anchor': 'end' });
    }
    for (const x of xTicks) {
      el('line', { x1: sx(x), x2: sx(x), y1: top, y2: top + panelH, class: 'grid' }, g);
    }
    if (panel.title) text(g, m.left, top - 8, panel.title, { class: 'panel-title' });

    for (const h of panel.hlines || []) {
      if (!(h.y >= y0 && h.y <= y1)) continue;
      el('line', { x1: m.left, x2: m.left + innerW, y1: sy(h.y), y2: sy(h.y), class: 'hline' }, g);
      if (h.label) {
        text(g, m.left + innerW - 4, sy(h.y) - 4, h.label, { class: 'tick', 'text-anchor': 'end' });
      }
    }
    for (const v of spec.vlines || []) {
      if (!(v.x >= x0 && v.x <= x1)) continue;
      el('line', { x1: sx(v.x), x2: sx(v.x), y1: top, y2: top + panelH, class: 'vline' }, g);
      if (v.label && i === 0) {
        text(g, sx(v.x) + 4, top + panelH - 6, v.label, { class: 'tick' });
      }
    }

    const clip = (y) => Math.min(top + panelH, Math.max(top, sy(y)));
    for (const s of panel.series) {
      let d = '';
      let pen = false;
      for (const [x, y] of s.points) {
        const ok = y !== null && Number.isFinite(y) && (!log || y > 0);
        if (!ok) { pen = false; continue; }
        d += `${pen ? 'L' : 'M'}${sx(x).toFixed(1)},${clip(y).toFixed(1)}`;
        pen = true;
      }
      if (d) {
        el('path', { d, fill: 'none', stroke: s.color, 'stroke-width': s.faint ? 1.6 : 2.2,
                     'stroke-opacity': s.faint ? 0.75 : 1, 'stroke-linejoin': 'round',
                     'stroke-dasharray': s.dashed ? '5 4' : 'none', class: 'series' }, g);
      }
      if (s.markers) {
        for (const [x, y, note] of s.points) {
          const ok = y !== null && Number.isFinite(y) && (!log || y > 0);
          const low = ok && s.lowBelow !== undefined && y < s.lowBelow;
          const attrs = { cx: sx(x), cy: ok ? clip(y) : top + panelH, r: ok ? 3.6 : 3,
                          fill: !ok ? '#fff' : low ? LOW : s.color,
                          stroke: low ? LOW : s.color,
                          'stroke-width': 1.5,
                          class: `pt ${s.cls || ''}`.trim(),
                          'data-x': x, 'data-y': ok ? y : 'null' };
          if (note) attrs['data-note'] = note;
          const c = el('circle', attrs, g);
          el('title', {}, c).textContent = `${s.label}: ${ok ? fmt(y) : 'n/a'} at ${fmt(x)}`
            + (note ? ` (${note})` : '')
            + (low ? ' (below min_mass: the model would hardly answer with any choice)' : '');
        }
      }
    }
    el('rect', { x: m.left, y: top, width: innerW, height: panelH, class: 'plot-frame' }, g);
    if (i === spec.panels.length - 1) {
      for (const x of xTicks) {
        text(g, sx(x), top + panelH + 16, fmt(x), { class: 'tick', 'text-anchor': 'middle' });
      }
      text(g, m.left + innerW / 2, top + panelH + 34, spec.xLabel || '',
           { class: 'axis-label', 'text-anchor': 'middle' });
    }
  });
  if (spec.empty) {
    text(svg, m.left + innerW / 2, m.top + 40, spec.empty, { class: 'empty', 'text-anchor': 'middle' });
  }
}
