// What the two charts show, as data for chart.js's drawChart (pure: no DOM).
import { PALETTE, STEERED, UNSTEERED } from './chart.js';
import { targetLogOdds, thinkingEnd } from './spec.js';

/** Readings below this mass are flagged by the server's default `min_mass`. */
export const MIN_MASS = 0.05;

const color = (k) => PALETTE[k % PALETTE.length];

/** What placed a live reading: "step \"Wait\"", "every", "start", "end" (older servers
 * send no trigger: "every"). */
export function triggerNote(r) {
  const kind = r.trigger || 'every';
  return kind === 'step' && r.marker ? `step ${JSON.stringify(r.marker)}` : kind;
}

/**
 * The live answer-confidence chart: x = generated-token index of each reading.
 * runs: {steered: [READING...], plain: [READING...]} (READING: one element of a probe's
 * `trajectory.readings`, in token order); panels: the target's log-odds per run, each
 * choice's probability (steered solid, unsteered dashed), the mass of the choices (log);
 * a dashed vertical line where a run's thinking section ended.
 */
export function liveChartSpec({ runs, choices, target, maxTokens }) {
  const list = [['steered', runs.steered || [], STEERED, false],
                ['unsteered', runs.plain || [], UNSTEERED, true]];
  const lastIdx = Math.max(0, ...list.flatMap(([, rs]) => rs.map((r) => r.token_index)));
  const vlines = [];
  for (const [label, rs] of list) {
    const x = thinkingEnd(rs);
    if (x !== null) vlines.push({ x, label: `${label}: thinking ended` });
  }
  const probSeries = [];
  choices.forEach((c, k) => {
    for (const [label, rs, , faint] of list) {
      probSeries.push({ label: `${c} (${label})`, color: color(k), dashed: faint, faint,
                        points: rs.map((r) => [r.token_index, r.probs ? r.probs[c] ?? null : null]) });
    }
  });
  return {
    xLabel: 'generated tokens',
    xDomain: [0, Math.max(1, Number(maxTokens) || 0, lastIdx)],
    legend: [{ label: 'steered', color: STEERED }, { label: 'unsteered', color: UNSTEERED, dashed: true },
             ...choices.map((c, k) => ({ label: c, color: color(k) }))],
    vlines,
    empty: list.every(([, rs]) => !rs.length) ? 'waiting for probe readings…' : null,
    panels: [
      { title: `log-odds of ${target}`, series: list.map(([label, rs, col, faint]) => ({
        label, color: col, dashed: faint, faint, markers: true, cls: `live-${label}`,
        points: rs.map((r) => [r.token_index, targetLogOdds(r, target), triggerNote(r)]) })) },
      { title: 'probability among the choices', yDomain: [0, 1], series: probSeries },
      { title: 'mass of the choices (log)', log: true, hlines: [{ y: MIN_MASS, label: 'min_mass' }],
        series: list.map(([label, rs, col, faint]) => ({
          label, color: col, dashed: faint, faint, lowBelow: MIN_MASS,
          points: rs.map((r) => [r.token_index, r.mass]) })) },
    ],
  };
}

/**
 * The coefficient-sweep chart: x = the swept parameter's value.
 * sweep: {values, choices, target, name, param, readings: Map(value -> READING),
 * refused?: Set(value)}; one marker per value that has a reading, in each panel.
 */
export function sweepChartSpec(sweep) {
  const xs = [...sweep.values].sort((a, b) => a - b);
  const got = xs.filter((x) => sweep.readings.has(x));
  const r = (x) => sweep.readings.get(x);
  // A value the server refused would only stretch the axis.
  const shown = xs.filter((x) => !(sweep.refused && sweep.refused.has(x)));
  const lo = Math.min(...(shown.length ? shown : xs));
  const hi = Math.max(...(shown.length ? shown : xs));
  const pad = hi > lo ? (hi - lo) * 0.05 : Math.max(1, Math.abs(lo) / 2);
  return {
    xLabel: `${sweep.name}: ${sweep.param}`,
    xDomain: [lo - pad, hi + pad],
    legend: sweep.choices.map((c, k) => ({ label: c, color: color(k) })),
    panels: [
      { title: `log-odds of ${sweep.target}`, hlines: [{ y: 0, label: '' }],
        series: [{ label: `log-odds of ${sweep.target}`, color: STEERED, markers: true,
                   cls: 'sweep-pt', points: got.map((x) => [x, targetLogOdds(r(x), sweep.target)]) }] },
      { title: 'probability among the choices', yDomain: [0, 1], series: sweep.choices.map((c, k) => ({
        label: c, color: color(k), markers: true,
        points: got.map((x) => [x, r(x).probs ? r(x).probs[c] ?? null : null]) })) },
      { title: 'mass of the choices (log)', log: true, hlines: [{ y: MIN_MASS, label: 'min_mass' }],
        series: [{ label: 'mass', color: UNSTEERED, markers: true, lowBelow: MIN_MASS,
                   points: got.map((x) => [x, r(x).mass]) }] },
    ],
  };
}
