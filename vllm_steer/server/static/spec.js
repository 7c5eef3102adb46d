// Pure functions (no DOM): what the controls' text becomes in a request, the snippets,
// and the numbers the charts show. The server validates everything; text the page cannot
// read as a number or a layer list is sent as typed, so the server's error names it.

export const OPS = ['add', 'ablate', 'clamp'];
/** The parameter each op takes (README "Interventions"). */
export const OP_PARAM = { add: 'scale', ablate: 'strength', clamp: 'value' };

/** "" -> undefined (leave it to the default); a finite number -> that number; anything
 * else -> the text itself (the server refuses it with the field named). */
export function parseNumber(text) {
  const t = String(text ?? '').trim();
  if (t === '') return undefined;
  const x = Number(t);
  return Number.isFinite(x) ? x : t;
}

/** "8-10, 15" -> [8, 9, 10, 15]; "" -> undefined (the vector's default layers). Text
 * that is not a list of indices and ranges is returned as typed. */
export function parseLayers(text) {
  const t = String(text ?? '').trim();
  if (t === '') return undefined;
  const out = [];
  for (const part of t.split(/[\s,]+/).filter(Boolean)) {
    const m = /^(\d+)(?:\s*[-–]\s*(\d+))?$/.exec(part);
    if (!m) return t;
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    if (b < a || b - a > 4096) return t;
    for (let i = a; i <= b; i += 1) out.push(i);
  }
  return out;
}

/** [8, 9, 10, 15] -> "8–10, 15" */
export function formatLayers(layers) {
  if (!Array.isArray(layers) || !layers.length) return '';
  const xs = [...layers].sort((a, b) => a - b);
  const parts = [];
  let start = xs[0];
  let prev = xs[0];
  for (const x of [...xs.slice(1), null]) {
    if (x !== null && x === prev + 1) { prev = x; continue; }
    parts.push(start === prev ? `${start}` : `${start}–${prev}`);
    start = x; prev = x;
  }
  return parts.join(', ');
}

/** "Yes, No" -> ["Yes", "No"] (blank entries dropped). */
export function parseChoices(text) {
  return String(text ?? '').split(',').map((s) => s.trim()).filter(Boolean);
}

/** "-2, 0, 1.5" -> {values: [-2, 0, 1.5]} or {error} naming the first bad entry. */
export function parseValues(text) {
  const parts = String(text ?? '').split(/[\s,]+/).filter(Boolean);
  if (!parts.length) return { error: 'give at least one value' };
  const values = [];
  for (const p of parts) {
    const x = Number(p);
    if (!Number.isFinite(x)) return { error: `${JSON.stringify(p)} is not a number` };
    values.push(x);
  }
  return { values };
}

/** The `condition` object of a request from the condition row: {name, layer, aggregate,
 * compare, threshold} as typed ("" -> the condition file's trained default); null when no
 * condition vector is chosen. */
export function buildCondition(c) {
  if (!c || !c.name) return null;
  const out = { name: c.name };
  const layer = parseNumber(c.layer);
  if (layer !== undefined) out.layer = layer;
  if (c.aggregate) out.aggregate = c.aggregate;
  if (c.compare) out.compare = c.compare;
  const t = parseNumber(c.threshold);
  if (t !== undefined) out.threshold = t;
  return out;
}

/** One line for a choice's `steering_condition` report: each condition's score against
 * its threshold and whether the rule held (so the steering applied). */
export function conditionText(report) {
  if (!report || typeof report !== 'object') return '';
  if (report.error) return `condition not read: ${report.error}`;
  const parts = (report.conditions || []).map((c) => {
    const s = typeof c.score === 'number' ? c.score.toFixed(4) : 'n/a';
    const op = c.compare === 'below' ? '≤' : '≥';
    return `${c.label} (layer ${c.layer}, ${c.aggregate}): score ${s} ${op} ${c.threshold}? `
      + `${c.holds ? 'yes' : 'no'}`;
  });
  const verdict = report.holds === null || report.holds === undefined ? 'undecided'
    : report.holds ? 'holds: steered' : 'does not hold: not steered';
  return `${parts.join('; ')} → ${verdict}`;
}

/** The `steering` object of a request from the composer's rows.
 * rows: [{name, op, param (text), layers (text)}]; apply_to; normalize (bool); condition
 * (the condition row, see buildCondition). With a condition, apply_to "all" is left to the
 * server's default for conditioned steering (the generated tokens). */
export function buildSpec({ rows, apply_to: applyTo, normalize, condition }) {
  const vectors = rows.map((r) => {
    const v = { name: r.name };
    if (r.op) v.op = r.op;
    const p = parseNumber(r.param);
    if (p !== undefined) v[OP_PARAM[r.op || 'add']] = p;
    const layers = parseLayers(r.layers);
    if (layers !== undefined) v.layers = layers;
    return v;
  });
  const spec = { vectors };
  if (applyTo && applyTo !== 'all') spec.apply_to = applyTo;
  if (normalize) spec.normalize = true;
  const cond = buildCondition(condition);
  if (cond) spec.condition = cond;
  return spec;
}

/** `spec` with vector `row`'s op parameter set to `value`. */
export function withParam(spec, row, value) {
  const out = structuredClone(spec);
  const v = out.vectors[row];
  v[OP_PARAM[v.op || 'add']] = value;
  return out;
}

/** The chat-completions body the page sends (without `stream`). */
export function chatBody({ model, prompt, system, maxTokens, temperature, seed, steering,
                           probe }) {
  const messages = [];
  if (system) messages.push({ role: 'system', content: system });
  messages.push({ role: 'user', content: prompt });
  const body = { model, messages };
  for (const [k, v] of [['max_tokens', parseNumber(maxTokens)],
                        ['temperature', parseNumber(temperature)], ['seed', parseNumber(seed)]]) {
    if (v !== undefined) body[k] = v;
  }
  if (steering) body.steering = steering;
  if (probe) body.probe = probe;
  return body;
}

/** The POST v1/steering/probe body of one sweep point (one reading, no generation). */
export function probeBody({ question, choices, suffix, steering }) {
  return { prompt: question, choices, suffix: suffix ? suffix : null, trajectory: false,
           steering };
}

function logSumExp(xs) {
  const finite = xs.filter((x) => x !== null && Number.isFinite(x));
  if (!finite.length) return -Infinity;
  const m = Math.max(...finite);
  return m + Math.log(finite.reduce((s, x) => s + Math.exp(x - m), 0));
}

/** log p_target - log sum_{c != target} p_c (null when not finite), as
 * vllm_steer.probe.sweep.target_log_odds. */
export function targetLogOdds(reading, target) {
  const lp = reading.logprobs || {};
  const t = lp[target];
  if (t === null || t === undefined) return null;
  const others = logSumExp(Object.entries(lp).filter(([c]) => c !== target).map(([, v]) => v));
  const x = t - others;
  return Number.isFinite(x) ? x : null;
}

/** Token index of the first reading after the thinking section closed (the first
 * in_thinking false after a true), or null. */
export function thinkingEnd(readings) {
  for (let i = 1; i < readings.length; i += 1) {
    if (readings[i - 1].in_thinking === true && readings[i].in_thinking === false) {
      return readings[i].token_index;
    }
  }
  return null;
}

/** Which control a server error points at. `param` is the error's field ("steering.
 * vectors[0].scale", "max_tokens", ...); `controls` maps exact params to elements, and
 * `rowControls(i, field)` finds a composer row's control. Falls back to the nearest
 * enclosing known param ("steering.vectors[0].scale.x" -> row 0's scale), then null. */
export function controlFor(param, controls, rowControls) {
  if (!param) return null;
  let p = String(param);
  for (;;) {
    if (controls[p]) return controls[p];
    const m = /^steering\.vectors\[(\d+)\](?:\.(\w+))?$/.exec(p);
    if (m && rowControls) {
      const el = rowControls(Number(m[1]), m[2] || null);
      if (el) return el;
    }
    const cut = Math.max(p.lastIndexOf('.'), p.lastIndexOf('['));
    if (cut <= 0) return null;
    p = p.slice(0, cut);
  }
}

function shellQuote(s) { return `'${s.replace(/'/g, `'\\''`)}'`; }

function pyLiteral(x, indent = 0) {
  const pad = ' '.repeat(indent);
  if (x === null || x === undefined) return 'None';
  if (x === true) return 'True';
  if (x === false) return 'False';
  if (typeof x === 'number') return Number.isInteger(x) ? `${x}` : `${x}`;
  if (typeof x === 'string') return JSON.stringify(x);
  if (Array.isArray(x)) {
    if (x.every((v) => typeof v !== 'object' || v === null)) {
      return `[${x.map((v) => pyLiteral(v)).join(', ')}]`;
    }
    return `[\n${x.map((v) => `${pad}    ${pyLiteral(v, indent + 4)}`).join(',\n')},\n${pad}]`;
  }
  const items = Object.entries(x).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v, indent)}`);
  return `{${items.join(', ')}}`;
}

/** curl and openai-Python snippets for `body` (a chat body) and a probe body.
 * `base`: the server root URL; `keyRequired`: reference $VLLM_API_KEY (never the key). */
export function snippets({ base, keyRequired, body, probe }) {
  const v1 = new URL('v1', base).href;
  const auth = keyRequired ? ` \\\n  -H "Authorization: Bearer $VLLM_API_KEY"` : '';
  const curl = `curl -s ${v1}/chat/completions \\\n  -H 'Content-Type: application/json'${auth} \\\n`
    + `  -d ${shellQuote(JSON.stringify(body, null, 2))}`;
  const { model, messages, steering, ...rest } = body;
  const kw = Object.entries(rest).filter(([k]) => k !== 'probe')
    .map(([k, v]) => `    ${k}=${pyLiteral(v)},`);
  const extra = {};
  if (steering) extra.steering = steering;
  if (body.probe) extra.probe = body.probe;
  const key = keyRequired ? 'os.environ["VLLM_API_KEY"]' : '"EMPTY"';
  const python = [
    'import os', '', 'from openai import OpenAI', '',
    `client = OpenAI(base_url=${JSON.stringify(v1)}, api_key=${key})`,
    'r = client.chat.completions.create(',
    `    model=${JSON.stringify(model)},`,
    `    messages=${pyLiteral(messages, 4)},`,
    ...kw,
    ...(Object.keys(extra).length ? [`    extra_body=${pyLiteral(extra, 4)},`] : []),
    ')',
    'print(r.choices[0].message.content)',
  ].join('\n');
  const probeCurl = `curl -s ${v1}/steering/probe \\\n  -H 'Content-Type: application/json'${auth} \\\n`
    + `  -d ${shellQuote(JSON.stringify(probe, null, 2))}`;
  return { curl, python, probe: probeCurl };
}
