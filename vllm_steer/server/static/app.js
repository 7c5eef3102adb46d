// The playground's wiring: controls -> requests -> outputs, charts and errors.
import {
  ApiError, BASE, del, getJSON, hasAdminKey, postBytes, postJSON, setAdminKey, setApiKey,
  streamChat, url,
} from './api.js';
import { drawChart } from './chart.js';
import {
  buildSpec, chatBody, conditionText, controlFor, formatLayers, OP_PARAM, OPS, parseChoices,
  parseLayers, parseValues, probeBody, snippets, targetLogOdds, withParam,
} from './spec.js';
import { liveChartSpec, sweepChartSpec } from './views.js';

const $ = (id) => document.getElementById(id);
const state = {
  keyRequired: false,
  connected: false,
  vectors: [],          // GET v1/steering/vectors data
  numLayers: null,
  liveProbe: 'unknown', // 'unknown' | 'available' | 'unavailable'
  gen: null,            // AbortController of the running generation
  live: { steered: [], plain: [] },
  sweep: null,          // {values, choices, target, readings: Map(value -> reading)}
  snippetTab: 'curl',
};

// -- small DOM helpers -----------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function setStatus(id, message, kind = '') {
  const e = $(id);
  e.textContent = message || '';
  e.classList.toggle('error', kind === 'error');
  e.classList.toggle('ok', kind === 'ok');
}

let errorSeq = 0;
/** Show `message` next to `control`: under its composer row (the row's width), else
 * inside its .field / .check / fieldset. */
function fieldError(control, message) {
  const box = control.closest('.vrow') || control.closest('.field, .check, fieldset')
    || control.parentNode;
  let p = box.querySelector(':scope > .field-error');
  if (!p) {
    errorSeq += 1;
    p = h('p', { class: 'field-error', id: `err-${errorSeq}`, role: 'alert' });
    box.append(p);
  }
  p.textContent = message;
  control.setAttribute('aria-invalid', 'true');
  control.setAttribute('aria-describedby', p.id);
  control.classList.add('invalid');
  return p;
}

function clearErrors(scope) {
  for (const p of scope.querySelectorAll('.field-error')) p.remove();
  for (const c of scope.querySelectorAll('[aria-invalid]')) {
    c.removeAttribute('aria-invalid');
    c.removeAttribute('aria-describedby');
    c.classList.remove('invalid');
  }
}

/** The controls that carry a data-param inside `scope`, by each param they name. */
function paramControls(...scopes) {
  const out = {};
  for (const scope of scopes) {
    for (const e of scope.querySelectorAll('[data-param]')) {
      for (const p of e.dataset.param.split(/\s+/)) if (!out[p]) out[p] = e;
    }
  }
  return out;
}

function rowControl(i, field) {
  const row = $('composer-rows').children[i];
  if (!row) return null;
  const cls = { name: '.r-name', path: '.r-name', op: '.r-op', scale: '.r-param',
                strength: '.r-param', value: '.r-param', layers: '.r-layers' }[field || 'name'];
  return row.querySelector(cls || '.r-name');
}

/** Put a server error next to the control its `param` names; returns that control or
 * null (then the caller shows it in its status line). */
function showServerError(err, controls, extra = {}) {
  const control = controlFor(err.param, { ...controls, ...extra }, rowControl);
  if (control) fieldError(control, err.message);
  return control;
}

function describe(err) {
  if (err instanceof ApiError) {
    const code = err.status ? `${err.status}` : 'error';
    const named = err.param && !err.message.includes(err.param) ? ` (${err.param})` : '';
    return `${code}${named}: ${err.message}`;
  }
  return String(err && err.message ? err.message : err);
}

// -- connecting ------------------------------------------------------------------------
async function start() {
  wireEvents();
  addRow(null); // a placeholder row until the vectors are known
  let cfg = { api_key_required: false, admin_key_required: false };
  try {
    cfg = await getJSON('steer/config.json');
  } catch (e) {
    setStatus('conn-status', `cannot read the page's config: ${describe(e)}`, 'error');
  }
  state.keyRequired = !!cfg.api_key_required;
  state.adminRequired = !!cfg.admin_key_required;
  if (state.keyRequired) {
    $('key-form').hidden = false;
    setStatus('conn-status', 'this server needs its API key', '');
    $('api-key').focus();
  } else {
    await connect();
  }
  refresh();
}

async function connect() {
  clearErrors($('key-form'));
  setStatus('conn-status', 'connecting…');
  try {
    const models = await getJSON('v1/models');
    const sel = $('model');
    sel.replaceChildren(...models.data.map((m) => h('option', { value: m.id, text: m.id })));
    sel.disabled = models.data.length < 2;
    await loadVectors();
    state.connected = true;
    const n = state.numLayers === null ? '' : ` · ${state.numLayers} layers`;
    setStatus('conn-status', `connected${n}`, 'ok');
    if (state.keyRequired) $('key-note').textContent = 'the key stays in this page only';
  } catch (e) {
    state.connected = false;
    if (e instanceof ApiError && e.status === 401) {
      fieldError($('api-key'), e.message);
      setStatus('conn-status', 'the server refused the key', 'error');
      $('api-key').focus();
    } else {
      setStatus('conn-status', `cannot reach the server: ${describe(e)}`, 'error');
    }
  }
  refresh();
}

// -- registered vectors ----------------------------------------------------------------
function defaultText(v) {
  const cond = conditionDefaults(v);
  if (cond) return `condition: layer ${cond.layer}, ${cond.aggregate}, ${cond.compare} ${cond.threshold}`;
  if (v.default_op === 'ablate') return `ablate, strength ${v.default_strength ?? 1}`;
  if (v.default_op === 'clamp') return `clamp, value ${v.default_value ?? 0}`;
  return `add, scale ${v.default_scale ?? 1}`;
}

function defaultParam(v) {
  if (!v) return '1';
  if (v.default_op === 'ablate') return String(v.default_strength ?? 1);
  if (v.default_op === 'clamp') return String(v.default_value ?? 0);
  return String(v.default_scale ?? 1);
}

async function loadVectors() {
  const list = await getJSON('v1/steering/vectors');
  state.vectors = list.data;
  state.numLayers = list.model ? list.model.num_layers : null;
  renderVectors();
  syncRowOptions();
  fillConditionNames();
}

function renderVectors() {
  const body = $('vector-table').tBodies[0];
  if (!state.vectors.length) {
    body.replaceChildren(h('tr', {}, h('td', { colspan: 4, class: 'muted',
      text: 'no vectors registered: upload one below' })));
    return;
  }
  body.replaceChildren(...state.vectors.map((v) => {
    const layers = v.default_layers || v.layers || [];
    const del = h('button', { type: 'button', class: 'small danger-outline',
                              'aria-label': `delete ${v.name}`, text: 'Delete' });
    del.addEventListener('click', () => deleteVector(v.name, del));
    const use = h('button', { type: 'button', class: 'small secondary',
                              'aria-label': `add ${v.name} to the steering`, text: 'Use' });
    use.addEventListener('click', () => { addRow(v.name); refresh(); });
    const origin = v.origin === 'registered' ? h('span', { class: 'badge', text: 'uploaded' }) : null;
    return h('tr', { 'data-name': v.name },
      h('td', {}, h('code', { text: v.name }), origin,
        v.error ? h('div', { class: 'field-error', text: v.error }) : null),
      h('td', { title: `${layers.length} layers: ${layers.join(', ')}` },
        formatLayers(layers), h('span', { class: 'muted', text: ` (${layers.length})` })),
      h('td', { text: defaultText(v) }),
      h('td', { class: 'row-actions' }, use, del));
  }));
}

// -- admin actions: the admin key is asked for only when one of them needs it ----------
/** Run `action` (an upload or a delete) with the admin key: asked for first when the
 * server needs one and the page has none; asked for again when the server refused it. */
async function asAdmin(statusId, action) {
  if (state.adminRequired && !hasAdminKey()) {
    state.pendingAdmin = { statusId, action };
    $('admin-form').hidden = false;
    setStatus(statusId, 'this action needs the steering admin key', '');
    $('admin-key').focus();
    return;
  }
  try {
    await action();
  } catch (e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 403) && state.adminRequired) {
      setAdminKey('');
      state.pendingAdmin = { statusId, action };
      $('admin-form').hidden = false;
      fieldError($('admin-key'), e.message);
      setStatus(statusId, 'the server refused the admin key', 'error');
      $('admin-key').focus();
      return;
    }
    throw e;
  }
}

function onAdminKey(ev) {
  ev.preventDefault();
  clearErrors($('admin-form'));
  setAdminKey($('admin-key').value.trim());
  $('admin-key').value = '';
  const pending = state.pendingAdmin;
  state.pendingAdmin = null;
  if (pending) {
    asAdmin(pending.statusId, pending.action).catch(
      (e) => setStatus(pending.statusId, describe(e), 'error'));
  }
}

async function deleteVector(name, button) {
  if (!button.classList.contains('confirm')) {
    button.classList.add('confirm');
    button.textContent = 'Confirm';
    button.setAttribute('aria-label', `confirm deleting ${name}`);
    setTimeout(() => {
      if (button.isConnected) {
        button.classList.remove('confirm');
        button.textContent = 'Delete';
        button.setAttribute('aria-label', `delete ${name}`);
      }
    }, 5000);
    return;
  }
  button.disabled = true;
  try {
    await asAdmin('vectors-status', async () => {
      await del(`v1/steering/vectors/${encodeURIComponent(name)}`, { admin: true });
      setStatus('vectors-status', `deleted ${name}`, 'ok');
      await loadVectors();
    });
  } catch (e) {
    setStatus('vectors-status', `delete ${name}: ${describe(e)}`, 'error');
  } finally {
    if (button.isConnected) button.disabled = false;
  }
  refresh();
}

function updateUploadParamLabel() {
  const op = $('up-op').value;
  $('up-param-label').textContent = `Default ${OP_PARAM[op]}`;
}

async function upload(ev) {
  ev.preventDefault();
  const form = $('upload-form');
  clearErrors(form);
  const file = $('up-file').files[0];
  const q = new URLSearchParams();
  q.set('name', $('up-name').value.trim());
  q.set('op', $('up-op').value);
  const param = $('up-param').value.trim();
  if (param) q.set(OP_PARAM[$('up-op').value], param);
  const layersText = $('up-layers').value.trim();
  if (layersText) {
    const layers = parseLayers(layersText);
    q.set('layers', Array.isArray(layers) ? layers.join(',') : layersText);
  }
  if ($('up-replace').checked) q.set('replace', 'true');
  $('up-submit').disabled = true;
  setStatus('upload-status', 'uploading…');
  try {
    const bytes = file ? await file.arrayBuffer() : new ArrayBuffer(0);
    await asAdmin('upload-status', async () => {
      const info = await postBytes(`v1/steering/vectors?${q}`, bytes, { admin: true });
      setStatus('upload-status', `registered ${info.name} (${formatLayers(info.layers)})`,
                'ok');
      form.reset();
      updateUploadParamLabel();
      await loadVectors();
    });
  } catch (e) {
    const shown = e instanceof ApiError ? showServerError(e, paramControls(form)) : null;
    setStatus('upload-status', shown ? 'refused: see the field above' : describe(e), 'error');
  } finally {
    $('up-submit').disabled = false;
  }
  refresh();
}

function onFileChosen() {
  const f = $('up-file').files[0];
  if (f && !$('up-name').value) {
    const stem = f.name.replace(/\.(safetensors|gguf)$/i, '').replace(/[^A-Za-z0-9_.-]+/g, '_');
    $('up-name').value = stem.replace(/^[^A-Za-z0-9]+/, '').slice(0, 128);
  }
}

// -- the composer ------------------------------------------------------------------------
function vectorByName(name) { return state.vectors.find((v) => v.name === name) || null; }

function addRow(name) {
  const rows = $('composer-rows');
  const first = name ?? (vectorByName('happy') ? 'happy' : state.vectors[0]?.name ?? '');
  const v = vectorByName(first);
  const nameSel = h('select', { class: 'r-name' });
  const opSel = h('select', { class: 'r-op' }, ...OPS.map((o) => h('option', { value: o, text: o })));
  const param = h('input', { class: 'r-param', type: 'text', inputmode: 'decimal',
                             spellcheck: 'false' });
  const layers = h('input', { class: 'r-layers', type: 'text', spellcheck: 'false' });
  const remove = h('button', { type: 'button', class: 'icon', text: '×' });
  const paramLabel = h('span', { class: 'r-param-label', text: 'Scale' });
  const row = h('div', { class: 'vrow' },
    h('label', { class: 'field f-name' }, 'Vector', nameSel),
    h('label', { class: 'field f-op' }, 'Op', opSel),
    h('label', { class: 'field f-param' }, paramLabel, param),
    h('label', { class: 'field f-layers' }, 'Layers', layers),
    remove);
  rows.append(row);
  fillNames(nameSel, first);
  opSel.value = v ? v.default_op || 'add' : 'add';
  // The happy vector's README example: scale 4 on the generated tokens.
  param.value = name === null && first === 'happy' && opSel.value === 'add' ? '4' : defaultParam(v);
  nameSel.addEventListener('change', () => {
    const nv = vectorByName(nameSel.value);
    opSel.value = nv ? nv.default_op || 'add' : 'add';
    param.value = defaultParam(nv);
    syncRow(row);
    refresh();
  });
  opSel.addEventListener('change', () => { syncRow(row); refresh(); });
  remove.addEventListener('click', () => {
    row.remove();
    renumberRows();
    refresh();
    ($('composer-rows').querySelector('.r-name') || $('add-row')).focus();
  });
  syncRow(row);
  renumberRows();
  return row;
}

function fillNames(sel, chosen) {
  const names = state.vectors.map((v) => v.name);
  if (chosen && !names.includes(chosen)) names.push(chosen); // deleted since: kept, the server says so
  sel.replaceChildren(...(names.length ? names : ['']).map((n) => h('option', {
    value: n, text: n || '(no vectors)' })));
  sel.value = chosen || names[0] || '';
}

function syncRowOptions() {
  const rows = [...$('composer-rows').children];
  // The placeholder row made before the vectors were known gets the default choice.
  if (rows.length === 1 && !rows[0].querySelector('.r-name').value && state.vectors.length) {
    rows[0].remove();
    addRow(null);
    return;
  }
  for (const row of rows) fillNames(row.querySelector('.r-name'), row.querySelector('.r-name').value);
}

function syncRow(row) {
  const v = vectorByName(row.querySelector('.r-name').value);
  const op = row.querySelector('.r-op').value;
  row.querySelector('.r-param-label').textContent = OP_PARAM[op][0].toUpperCase() + OP_PARAM[op].slice(1);
  const layers = v ? (v.default_layers || v.layers || []) : [];
  const input = row.querySelector('.r-layers');
  input.placeholder = layers.length ? formatLayers(layers) : 'default';
  input.title = `empty: the vector's default layers${layers.length ? ` (${formatLayers(layers)})` : ''}; `
    + 'or e.g. 8-12, 15';
}

function renumberRows() {
  [...$('composer-rows').children].forEach((row, i) => {
    row.dataset.row = String(i);
    const n = i + 1;
    row.querySelector('.r-name').setAttribute('data-param', `steering.vectors[${i}].name steering.vectors[${i}].path`);
    row.querySelector('.r-op').setAttribute('data-param', `steering.vectors[${i}].op`);
    row.querySelector('.r-param').setAttribute('data-param', `steering.vectors[${i}].scale`);
    row.querySelector('.r-layers').setAttribute('data-param', `steering.vectors[${i}].layers`);
    row.querySelector('.icon').setAttribute('aria-label', `remove vector ${n}`);
  });
}

function readRows() {
  return [...$('composer-rows').children].map((row) => ({
    name: row.querySelector('.r-name').value,
    op: row.querySelector('.r-op').value,
    param: row.querySelector('.r-param').value,
    layers: row.querySelector('.r-layers').value,
  }));
}

/** The current steering object, or null when the composer has no vector. */
function currentSpec() {
  const rows = readRows();
  if (!rows.length) return null;
  return buildSpec({ rows, apply_to: $('apply-to').value, normalize: $('normalize').checked,
                    condition: readCondition() });
}

function readCondition() {
  return { name: $('cond-name').value, layer: $('cond-layer').value,
           aggregate: $('cond-aggregate').value, compare: $('cond-compare').value,
           threshold: $('cond-threshold').value };
}

/** The trained defaults a condition vector's file carries (metadata "extra.condition"). */
function conditionDefaults(v) {
  const raw = v && v.metadata ? v.metadata['extra.condition'] : null;
  if (!raw) return null;
  try { return JSON.parse(raw); } catch { return null; }
}

function fillConditionNames() {
  const sel = $('cond-name');
  const chosen = sel.value;
  // condition vectors (trained, with defaults) first; any vector may serve as a direction
  const names = [...state.vectors].sort((a, b) => Number(!!conditionDefaults(b))
    - Number(!!conditionDefaults(a))).map((v) => v.name);
  sel.replaceChildren(h('option', { value: '', text: 'none: always steer' }),
    ...names.map((n) => h('option', { value: n, text: n })));
  sel.value = names.includes(chosen) ? chosen : '';
}

function specSummary(spec) {
  if (!spec) return 'no vector: same as unsteered';
  const parts = spec.vectors.map((v) => {
    const p = v[OP_PARAM[v.op || 'add']];
    return `${v.name} ${v.op || 'add'}${p === undefined ? '' : ` ${p}`}`;
  });
  const where = spec.apply_to || (spec.condition ? 'generated' : 'all');
  return `${parts.join(' + ')} · ${where}${spec.normalize ? ' · normalize' : ''}`
    + (spec.condition ? ` · if ${spec.condition.name}` : '');
}

// -- generation --------------------------------------------------------------------------
function genSettings() {
  return {
    model: $('model').value,
    prompt: $('prompt').value,
    system: $('system').value.trim(),
    maxTokens: $('max-tokens').value,
    temperature: $('temperature').value,
    seed: $('seed').value,
  };
}

function liveProbeConfig() {
  if (!$('live-on').checked || state.liveProbe === 'unavailable') return null;
  const every = $('live-every').value.trim();
  const cfg = { choices: parseChoices($('live-choices').value) };
  // 'steps': fork where the text reaches a reasoning step (blank line, "Wait", ...);
  // N tokens is then the "at least every N tokens" fallback (empty: none)
  if ($('live-trigger').value === 'steps') cfg.trigger = 'steps';
  if (every) cfg.every = Number.isFinite(Number(every)) ? Number(every) : every;
  return cfg;
}

function triggerLabel() {
  $('live-every-label').textContent = $('live-trigger').value === 'steps'
    ? 'At least every N tokens' : 'Every N tokens';
}

function resetOutput(which) {
  $(`out-${which}`).textContent = '';
  $(`out-${which}`).classList.remove('failed');
  $(`meta-${which}`).textContent = '';
  if (which === 'steered') $('cond-steered').textContent = '';
}

async function runOne(which, body, signal) {
  const out = $(`out-${which}`);
  const t0 = performance.now();
  let tokens = 0;
  let finish = null;
  let usage = null;
  const readings = state.live[which];
  let bad = 0;
  out.classList.add('streaming');
  try {
    await streamChat({ ...body, stream_options: { include_usage: true } }, {
      signal,
      onChunk: (c) => {
        if (c.reasoning) out.append(h('span', { class: 'reasoning', text: c.reasoning }));
        if (c.text) out.append(c.text);
        if (c.text || c.reasoning) tokens += 1;
        if (c.finish) finish = c.finish;
        if (c.usage) usage = c.usage;
        if (c.condition && which === 'steered') {
          $('cond-steered').textContent = `condition: ${conditionText(c.condition)}`;
        }
        if (c.readings.length || c.bad) {
          readings.push(...c.readings);
          bad += c.bad;
          drawLive();
        }
      },
    });
  } finally {
    out.classList.remove('streaming');
  }
  const n = usage ? usage.completion_tokens : tokens;
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  $(`meta-${which}`).textContent = `${n} tokens · ${secs} s · finish: ${finish ?? 'n/a'}`
    + (readings.length ? ` · ${readings.length} probe readings` : '');
  return { readings: readings.length, bad };
}

async function generate(ev, { retryWithoutProbe = false } = {}) {
  if (ev) ev.preventDefault();
  if (state.gen) return;
  const form = $('gen-form');
  for (const scope of [form, $('composer-card'), $('model-field')]) clearErrors(scope);
  setStatus('live-status', state.liveProbe === 'unavailable' ? $('live-status').textContent : '');
  const spec = currentSpec();
  const probe = liveProbeConfig();
  const base = { ...genSettings(), probe };
  const bodies = { steered: chatBody({ ...base, steering: spec }), plain: chatBody({ ...base, steering: null }) };
  state.live = { steered: [], plain: [] };
  $('live-figure').hidden = !probe;
  if (probe) drawLive();
  $('steered-summary').textContent = specSummary(spec);
  resetOutput('steered');
  resetOutput('plain');
  const ctl = new AbortController();
  state.gen = ctl;
  $('generate').disabled = true;
  $('stop').disabled = false;
  setStatus('gen-status', retryWithoutProbe ? 'generating again without the live probe…' : 'generating…');
  const results = await Promise.allSettled(['steered', 'plain'].map((w) => runOne(w, bodies[w], ctl.signal)));
  state.gen = null;
  $('generate').disabled = false;
  $('stop').disabled = true;

  const errors = results.map((r, k) => [['steered', 'plain'][k], r]).filter(([, r]) => r.status === 'rejected');
  if (errors.some(([, r]) => r.reason && r.reason.name === 'AbortError')) {
    setStatus('gen-status', 'stopped');
    return;
  }
  const probeRefused = errors.find(([, r]) => r.reason instanceof ApiError && r.reason.param === 'probe');
  if (probe && probeRefused) {
    state.liveProbe = 'unavailable';
    $('live-on').checked = false;
    $('live-on').disabled = true;
    $('live-figure').hidden = true;
    setStatus('live-status', `Live answer probing is unavailable on this server: ${probeRefused[1].reason.message}`, 'error');
    return generate(null, { retryWithoutProbe: true });
  }
  let unplaced = 0;
  for (const [which, r] of errors) {
    const err = r.reason;
    $(`out-${which}`).classList.add('failed');
    $(`out-${which}`).textContent = `The server refused this request: ${describe(err)}`;
    if (err instanceof ApiError && which === 'steered') {
      const controls = paramControls(form, $('composer-card'), $('model-field'));
      if (!showServerError(err, controls)) unplaced += 1;
    } else if (err instanceof ApiError && !String(err.param || '').startsWith('steering')) {
      if (!showServerError(err, paramControls(form, $('model-field')))) unplaced += 1;
    }
  }
  if (errors.length) {
    setStatus('gen-status', unplaced ? describe(errors[0][1].reason) : 'refused: see the highlighted field', 'error');
  } else {
    setStatus('gen-status', 'done', 'ok');
  }
  if (probe && !errors.length) {
    const got = results.reduce((s, r) => s + r.value.readings, 0);
    if (got === 0) {
      setStatus('live-status', 'Live answer probing is unavailable on this server: no probe '
        + 'readings arrived with the stream.', 'error');
      $('live-figure').hidden = true;
    } else {
      state.liveProbe = 'available';
      const bad = results.reduce((s, r) => s + r.value.bad, 0);
      setStatus('live-status', `${got} readings${bad ? `, ${bad} malformed ones skipped` : ''}`, bad ? 'error' : 'ok');
    }
  }
}

function drawLive() {
  const choices = parseChoices($('live-choices').value);
  drawChart($('live-chart'), liveChartSpec({
    runs: state.live, choices, target: $('live-target').value || choices[0],
    maxTokens: $('max-tokens').value }));
}

// -- the sweep ---------------------------------------------------------------------------
function sweepRowOptions() {
  const sel = $('sw-row');
  const keep = sel.value;
  const rows = readRows();
  sel.replaceChildren(...rows.map((r, i) => h('option', { value: String(i),
    text: `${i + 1}: ${r.name || '?'} (${OP_PARAM[r.op]})` })));
  if (keep && Number(keep) < rows.length) sel.value = keep;
  sel.disabled = !rows.length;
}

function targetOptions(selId, choicesId) {
  const sel = $(selId);
  const keep = sel.value;
  const choices = parseChoices($(choicesId).value);
  sel.replaceChildren(...choices.map((c) => h('option', { value: c, text: c })));
  if (choices.includes(keep)) sel.value = keep;
}

function sweepHint() {
  const applyTo = $('apply-to').value;
  const hint = (['generated', 'thinking', 'answer'].includes(applyTo) && !$('sw-suffix').value)
    ? `With apply_to: ${applyTo} and no forcing suffix each reading is taken right after the `
      + 'prompt, before any token that steering touches: every value reads the same. Use all '
      + 'or prompt, or give a suffix.'
    : '';
  $('sweep-hint').textContent = hint;
}

async function runSweep(ev) {
  ev.preventDefault();
  const form = $('sweep-form');
  clearErrors(form);
  clearErrors($('composer-card'));
  const spec = currentSpec();
  if (!spec) {
    fieldError($('sw-row'), 'add a vector to the steering first');
    return;
  }
  const parsed = parseValues($('sw-values').value);
  if (parsed.error) {
    fieldError($('sw-values'), parsed.error);
    return;
  }
  const row = Number($('sw-row').value || 0);
  const choices = parseChoices($('sw-choices').value);
  const sweep = { values: parsed.values, choices, target: $('sw-target').value || choices[0],
                  readings: new Map(), refused: new Set(), param: OP_PARAM[spec.vectors[row].op || 'add'],
                  name: spec.vectors[row].name };
  state.sweep = sweep;
  drawSweep();
  $('run-sweep').disabled = true;
  setStatus('sweep-status', `0/${sweep.values.length}…`);
  const t0 = performance.now();
  const queue = [...sweep.values];
  let failed = null;
  const worker = async () => {
    while (queue.length && !failed) {
      const value = queue.shift();
      const body = probeBody({ question: $('sw-question').value, choices,
                               suffix: $('sw-suffix').value, steering: withParam(spec, row, value) });
      try {
        const res = await postJSON('v1/steering/probe', body);
        sweep.readings.set(value, res.trajectory.readings[0]);
        if (state.sweep === sweep) {
          drawSweep();
          setStatus('sweep-status', `${sweep.readings.size}/${sweep.values.length}…`);
        }
      } catch (e) {
        failed = failed || { value, error: e };
        sweep.refused.add(value);
      }
    }
  };
  await Promise.all([worker(), worker(), worker()]);
  $('run-sweep').disabled = false;
  drawSweep();
  if (failed) {
    const e = failed.error;
    const own = new RegExp(`^steering\\.vectors\\[${row}\\]\\.(scale|strength|value)$`);
    let shown = null;
    if (e instanceof ApiError && own.test(e.param || '')) {
      shown = fieldError($('sw-values'), `${sweep.param} ${failed.value}: ${e.message}`);
    } else if (e instanceof ApiError) {
      shown = showServerError(e, paramControls(form, $('composer-card')));
    }
    setStatus('sweep-status', shown ? 'the server refused a point: see the highlighted field'
      : `the server refused ${sweep.param} ${failed.value}: ${describe(e)}`, 'error');
  } else {
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    setStatus('sweep-status', `${sweep.values.length} points in ${secs} s`, 'ok');
  }
}

function drawSweep() {
  const s = state.sweep;
  const svg = $('sweep-chart');
  if (!s) {
    drawChart(svg, { xLabel: '', xDomain: [-1, 1], panels: [{ title: '', series: [] }], bare: true,
                     empty: 'Run a sweep to see how the answer moves with the value.', panelHeight: 90 });
    return;
  }
  drawChart(svg, sweepChartSpec(s));
  const got = [...s.values].sort((a, b) => a - b).filter((x) => s.readings.has(x));
  const head = h('tr', {}, h('th', { scope: 'col', text: s.param }), h('th', { scope: 'col', text: `log-odds ${s.target}` }),
    ...s.choices.map((c) => h('th', { scope: 'col', text: `P(${c})` })), h('th', { scope: 'col', text: 'mass' }));
  const fmt = (x) => (x === null || x === undefined ? '–' : Number(x).toFixed(3));
  $('sweep-table').replaceChildren(h('thead', {}, head), h('tbody', {}, ...got.map((x) => {
    const r = s.readings.get(x);
    return h('tr', {}, h('td', { text: String(x) }), h('td', { text: fmt(targetLogOdds(r, s.target)) }),
      ...s.choices.map((c) => h('td', { text: fmt(r.probs?.[c]) })),
      h('td', { text: fmt(r.mass) + (r.low_mass ? ' (low)' : '') }));
  })));
}

// -- snippets ----------------------------------------------------------------------------
function renderSnippets() {
  const spec = currentSpec();
  const body = chatBody({ ...genSettings(), steering: spec });
  const first = parseValues($('sw-values').value).values?.[0];
  const row = Number($('sw-row').value || 0);
  const probeSteering = spec && first !== undefined && spec.vectors[row] ? withParam(spec, row, first) : spec;
  const probe = probeBody({ question: $('sw-question').value, choices: parseChoices($('sw-choices').value),
                            suffix: $('sw-suffix').value, steering: probeSteering });
  const all = snippets({ base: BASE.href, keyRequired: state.keyRequired, body, probe });
  $('snippet').textContent = all[state.snippetTab];
  $('spec-json').textContent = JSON.stringify(spec, null, 2);
}

function selectTab(name, focus = false) {
  state.snippetTab = name;
  for (const t of ['curl', 'python', 'probe']) {
    const b = $(`tab-${t}`);
    b.setAttribute('aria-selected', String(t === name));
    b.tabIndex = t === name ? 0 : -1;
    if (t === name && focus) b.focus();
  }
  renderSnippets();
}

async function copySnippet() {
  const text = $('snippet').textContent;
  try {
    if (!navigator.clipboard) throw new Error('no clipboard API on this origin');
    await navigator.clipboard.writeText(text);
    setStatus('copy-status', 'copied', 'ok');
  } catch {
    // Plain-http origins other than localhost have no async clipboard: select it instead.
    const range = document.createRange();
    range.selectNodeContents($('snippet'));
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    setStatus('copy-status', 'selected: press Ctrl+C to copy');
  }
}

// -- events ------------------------------------------------------------------------------
let refreshQueued = false;
function refresh() {
  if (refreshQueued) return;
  refreshQueued = true;
  requestAnimationFrame(() => {
    refreshQueued = false;
    sweepRowOptions();
    targetOptions('sw-target', 'sw-choices');
    targetOptions('live-target', 'live-choices');
    sweepHint();
    renderSnippets();
    const ready = state.connected;
    $('generate').disabled = !ready || !!state.gen;
    $('run-sweep').disabled = !ready;
  });
}

function wireEvents() {
  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    setApiKey($('api-key').value.trim());
    connect();
  });
  $('upload-form').addEventListener('submit', upload);
  $('admin-form').addEventListener('submit', onAdminKey);
  $('up-op').addEventListener('change', updateUploadParamLabel);
  $('up-file').addEventListener('change', onFileChosen);
  $('add-row').addEventListener('click', () => {
    const row = addRow(state.vectors[0]?.name ?? '');
    row.querySelector('.r-name').focus();
    refresh();
  });
  $('gen-form').addEventListener('submit', generate);
  $('stop').addEventListener('click', () => state.gen && state.gen.abort());
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $('gen-form').requestSubmit();
    }
  });
  $('live-on').addEventListener('change', () => {
    $('live-figure').hidden = !$('live-on').checked || !state.live.steered.length;
  });
  $('live-trigger').addEventListener('change', triggerLabel);
  $('sweep-form').addEventListener('submit', runSweep);
  for (const id of ['curl', 'python', 'probe']) {
    $(`tab-${id}`).addEventListener('click', () => selectTab(id));
    $(`tab-${id}`).addEventListener('keydown', (ev) => {
      const order = ['curl', 'python', 'probe'];
      const k = order.indexOf(state.snippetTab);
      if (ev.key === 'ArrowRight') selectTab(order[(k + 1) % 3], true);
      if (ev.key === 'ArrowLeft') selectTab(order[(k + 2) % 3], true);
    });
  }
  $('copy-snippet').addEventListener('click', copySnippet);
  // Any edit can change the snippets, the sweep's row list, targets and hints.
  document.addEventListener('input', refresh);
  document.addEventListener('change', refresh);
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      drawSweep();
      if (state.live.steered.length || state.live.plain.length) drawLive();
    }, 150);
  });
  selectTab('curl');
  drawSweep();
}

// Exposed for the tests and for poking around in the console.
window.vllmSteerPlayground = { state, url };
start();
