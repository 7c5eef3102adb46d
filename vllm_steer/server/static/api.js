// Talking to the server: relative URLs, the bearer key, OpenAI-shaped errors, SSE streams.
//
// Every URL is resolved against the directory above this file (the page's files are
// served under <prefix>/steer/), so the page works behind a path prefix.

/** The server's root as the browser sees it (origin + path prefix + '/'). */
export const BASE = new URL('../', import.meta.url);

let apiKey = '';
let adminKey = '';

/** The key is kept here only (never in storage); '' sends no Authorization header. */
export function setApiKey(key) { apiKey = key || ''; }

/** The steering admin key, asked for only when an admin action (upload, delete) needs
 * it; kept here only, sent only with those calls. */
export function setAdminKey(key) { adminKey = key || ''; }
export function hasAdminKey() { return !!adminKey; }

export function url(path) { return new URL(path, BASE).href; }

function headers(extra = {}, admin = false) {
  const h = { ...extra };
  const key = admin && adminKey ? adminKey : apiKey;
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** An error answered by the server (status, message, and the field it names). */
export class ApiError extends Error {
  constructor(status, message, param = null, type = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.param = param;
    this.type = type;
  }
}

/** An error object's message, without the " (parameter=FIELD)" that vLLM appends when the
 * field is named in `param` anyway. */
function message(e) {
  const text = String(e.message ?? JSON.stringify(e));
  const tail = e.param ? ` (parameter=${e.param})` : null;
  return tail && text.endsWith(tail) ? text.slice(0, -tail.length) : text;
}

/** The server's own error from an OpenAI-shaped body ({"error": {message, type, param,
 * code}}), FastAPI's {"detail": ...}, or the bare HTTP status. */
export function errorFromBody(status, body, statusText = '') {
  const e = body && typeof body === 'object' ? body.error : null;
  if (e && typeof e === 'object') {
    return new ApiError(status, message(e), e.param ?? null, e.type ?? null);
  }
  if (typeof e === 'string') return new ApiError(status, e);
  if (body && body.detail !== undefined) {
    const d = body.detail;
    return new ApiError(status, typeof d === 'string' ? d : JSON.stringify(d));
  }
  return new ApiError(status, `HTTP ${status}${statusText ? ` ${statusText}` : ''}`);
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: report the status */ }
  return errorFromBody(response.status, body, response.statusText);
}

async function call(method, path, { json, bytes, signal, contentType, admin } = {}) {
  const init = { method, signal, headers: headers({}, admin) };
  if (json !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(json);
  } else if (bytes !== undefined) {
    init.headers['Content-Type'] = contentType || 'application/octet-stream';
    init.body = bytes;
  }
  const r = await fetch(url(path), init);
  if (!r.ok) throw await errorFrom(r);
  return r.json();
}

export const getJSON = (path, opts) => call('GET', path, opts);
export const postJSON = (path, json, opts = {}) => call('POST', path, { ...opts, json });
export const postBytes = (path, bytes, opts = {}) => call('POST', path, { ...opts, bytes });
export const del = (path, opts) => call('DELETE', path, opts);

/** Incremental Server-Sent Events parser: push() text as it arrives, get back the
 * `data` payload of every event completed by it (multi-line data joined with "\n"). */
export class SSEParser {
  constructor() { this.buf = ''; this.data = []; }

  push(text) {
    this.buf += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
      if (m[0] === '\r' && m.index === this.buf.length - 1) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      if (line === '') {
        if (this.data.length) out.push(this.data.join('\n'));
        this.data = [];
      } else if (line.startsWith('data:')) {
        this.data.push(line.slice(line[5] === ' ' ? 6 : 5));
      } // comments (":...") and other fields (event, id, retry) carry nothing we use
    }
    return out;
  }

  /** The payload of an event left unterminated when the stream ended, if any. */
  end() {
    const out = this.push('\n\n');
    this.buf = '';
    return out;
  }
}

/** True for one live answer-probe reading: the JSON of one element of
 * `trajectory.readings` of POST /v1/steering/probe. */
export function isReading(r) {
  return !!r && typeof r === 'object' && Number.isInteger(r.token_index)
    && r.logprobs !== null && typeof r.logprobs === 'object'
    && (r.mass === null || typeof r.mass === 'number');
}

/** What one chat-completion stream chunk carries for choice 0: text, finish reason,
 * usage, probe readings (valid ones, in order; `bad` counts malformed ones), the
 * condition report (`steering_condition`, on the finish chunk), or an error. */
export function readChunk(obj) {
  if (!obj || typeof obj !== 'object') throw new ApiError(0, 'malformed stream event');
  if (obj.error) {
    const e = obj.error;
    return { error: new ApiError(e.code ?? 500, message(e), e.param ?? null, e.type ?? null) };
  }
  const out = { text: '', reasoning: '', finish: null, readings: [], bad: 0,
                usage: obj.usage || null, condition: null };
  for (const c of obj.choices || []) {
    if ((c.index ?? 0) !== 0) continue;
    const d = c.delta || {};
    if (typeof d.content === 'string') out.text += d.content;
    const r = d.reasoning_content ?? d.reasoning;
    if (typeof r === 'string') out.reasoning += r;
    if (c.finish_reason) out.finish = c.finish_reason;
    if (c.steering_condition && typeof c.steering_condition === 'object') {
      out.condition = c.steering_condition;
    }
    if (c.probe_readings !== undefined) {
      const list = Array.isArray(c.probe_readings) ? c.probe_readings : [c.probe_readings];
      for (const reading of list) {
        if (isReading(reading)) out.readings.push(reading); else out.bad += 1;
      }
    }
  }
  return out;
}

/** POST a streaming chat completion; calls onChunk(readChunk(...)) per event. Throws
 * ApiError for a refused request (before the stream) or an error event (inside it). */
export async function streamChat(body, { signal, onChunk }) {
  const r = await fetch(url('v1/chat/completions'), {
    method: 'POST', signal, headers: headers({ 'Content-Type': 'application/json' }),
    body: JSON.stringify({ ...body, stream: true }),
  });
  if (!r.ok) throw await errorFrom(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  const handle = (data) => {
    if (data === '[DONE]') return true;
    let obj;
    try { obj = JSON.parse(data); } catch {
      throw new ApiError(0, `malformed stream event: ${data.slice(0, 120)}`);
    }
    const chunk = readChunk(obj);
    if (chunk.error) throw chunk.error;
    onChunk(chunk);
    return false;
  };
  for (;;) {
    const { value, done } = await reader.read();
    const events = done ? [...parser.push(decoder.decode()), ...parser.end()]
      : parser.push(decoder.decode(value, { stream: true }));
    for (const data of events) {
      if (handle(data)) { await reader.cancel().catch(() => {}); return; }
    }
    if (done) return;
  }
}
