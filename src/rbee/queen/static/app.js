// rbee web page: the cluster live, a playground, and the journey of one job.
//
// Every request carries the queen's token as a bearer header when it has one;
// server-sent events are read with fetch() and a stream parser because
// EventSource cannot send headers. The cluster view is pushed by the queen
// (/v1/cluster/events); nothing here polls the network.
'use strict';
(() => {
  const TOKEN_KEY = 'rbee.token';
  const WATCHDOG_MS = 12000; // the queen sends a snapshot at least every 5 s

  // -- small helpers ---------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  // Builds DOM nodes; text always goes in as text, never as markup.
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat()) {
      // Empty text adds no node, so an empty cell stays :empty (hidden on a phone).
      if (kid === null || kid === undefined || kid === false || kid === '') continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  const badge = (state) => h('span', { class: `badge ${state}`, text: String(state).replace('_', ' ') });
  const shortId = (id) => (id ? id.replace(/^job-/, '').slice(0, 8) : '');
  const jobLink = (id) => h('a', { href: `#/jobs/${id}`, class: 'mono', title: id, text: shortId(id) });

  function fmtMs(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return '';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  }

  function fmtAgo(seconds) {
    if (seconds < 1) return 'just now';
    if (seconds < 60) return `${Math.floor(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    return `${Math.floor(seconds / 3600)} h ago`;
  }

  function fmtBytes(n) {
    if (!n) return '';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
  }

  // A table that turns into stacked rows on a phone (labels from the header).
  function table(columns, rows) {
    return h('table', { class: 'stack' },
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { class: c.num ? 'num' : null, text: c.label })))),
      h('tbody', {}, rows.map((row) => h('tr', row.attrs || {}, columns.map((c, i) =>
        h('td', { 'data-label': c.label, class: [c.num ? 'num' : '', c.clip ? 'clip' : ''].join(' ').trim() || null },
          row.cells[i]))))));
  }

  // -- the token and the API -------------------------------------------------

  let token = sessionStorage.getItem(TOKEN_KEY) || '';

  class AuthError extends Error {}
  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || `the queen answered ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  function authHeaders(extra) {
    const headers = { ...(extra || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    return headers;
  }

  async function api(method, path, body) {
    const res = await fetch(path, {
      method,
      cache: 'no-store',
      headers: authHeaders(body === undefined ? {} : { 'Content-Type': 'application/json' }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (res.status === 401) { askForToken(token ? 'The queen refused that token.' : ''); throw new AuthError('unauthorized'); }
    const data = await res.json().catch(() => null);
    if (!res.ok && res.status !== 409) throw new HttpError(res.status, data);
    return data;
  }

  // Reads a text/event-stream body and calls onEvent({id, event, data}) per frame.
  // Resolves when the server closes the stream; rejects on network errors or abort.
  async function readSSE(path, { signal, lastEventId, onEvent, onComment }) {
    const headers = authHeaders({ Accept: 'text/event-stream' });
    if (lastEventId) headers['Last-Event-ID'] = String(lastEventId);
    const res = await fetch(path, { headers, signal, cache: 'no-store' });
    if (res.status === 401) { askForToken(token ? 'The queen refused that token.' : ''); throw new AuthError('unauthorized'); }
    if (!res.ok) throw new HttpError(res.status, await res.json().catch(() => null));
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let frame = { id: null, event: 'message', data: [] };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        for (;;) {
          const m = /\r\n|\r|\n/.exec(buffer);
          if (!m) break;
          // A lone CR at the end may be the first half of CRLF: wait for more.
          if (m[0] === '\r' && m.index === buffer.length - 1) break;
          const line = buffer.slice(0, m.index);
          buffer = buffer.slice(m.index + m[0].length);
          if (line === '') {
            if (frame.data.length) onEvent({ id: frame.id, event: frame.event, data: frame.data.join('\n') });
            frame = { id: frame.id, event: 'message', data: [] };
          } else if (line.startsWith(':')) {
            if (onComment) onComment(line.slice(1).trim());
          } else {
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            let val = colon < 0 ? '' : line.slice(colon + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'data') frame.data.push(val);
            else if (field === 'event') frame.event = val;
            else if (field === 'id') frame.id = val;
          }
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // -- views and routing -----------------------------------------------------

  const VIEWS = ['login', 'cluster', 'play', 'job'];
  let needsToken = false;

  function show(name) {
    for (const v of VIEWS) $(`view-${v}`).hidden = v !== name;
    for (const a of document.querySelectorAll('[data-nav]')) {
      if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
  }

  function route() {
    if (needsToken) { show('login'); return; }
    const hash = location.hash || '#/';
    const job = /^#\/jobs\/([A-Za-z0-9._:-]+)$/.exec(hash);
    if (job) { show('job'); openJob(job[1]); return; }
    if (hash === '#/play') { show('play'); $('play-prompt').focus({ preventScroll: true }); return; }
    show('cluster');
  }

  function askForToken(message) {
    needsToken = true;
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    stopFeed();
    setConn('offline', 'needs token');
    $('login-error').hidden = !message;
    $('login-error').textContent = message || '';
    show('login');
    $('login-token').focus();
  }

  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    token = $('login-token').value.trim();
    needsToken = false;
    try {
      await api('GET', '/v1/info');
    } catch (err) {
      if (!(err instanceof AuthError)) { $('login-error').hidden = false; $('login-error').textContent = String(err.message || err); }
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $('login-token').value = '';
    $('login-error').hidden = true;
    startFeed();
    route();
  });

  // -- the cluster feed ------------------------------------------------------

  const feed = { snap: null, skew: 0, ctrl: null, running: false };

  function setConn(state, text) {
    const el = $('conn');
    el.dataset.state = state;
    el.textContent = text || state;
  }

  function stopFeed() {
    feed.running = false;
    if (feed.ctrl) feed.ctrl.abort();
  }

  async function startFeed() {
    if (feed.running) return;
    feed.running = true;
    let backoff = 500;
    while (feed.running) {
      const ctrl = new AbortController();
      feed.ctrl = ctrl;
      let watchdog = setTimeout(() => ctrl.abort(), WATCHDOG_MS);
      const alive = () => { clearTimeout(watchdog); watchdog = setTimeout(() => ctrl.abort(), WATCHDOG_MS); };
      try {
        await readSSE('/v1/cluster/events', {
          signal: ctrl.signal,
          onComment: alive,
          onEvent: (e) => {
            alive();
            if (e.event !== 'cluster') return;
            const snap = JSON.parse(e.data);
            feed.skew = Date.now() / 1000 - snap.now;
            feed.snap = snap;
            backoff = 500;
            setConn('live');
            renderCluster();
            renderModels();
          },
        });
      } catch (err) {
        if (err instanceof AuthError) return;
      } finally {
        clearTimeout(watchdog);
      }
      if (!feed.running) return;
      setConn('connecting', 'reconnecting');
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  const serverNow = () => Date.now() / 1000 - feed.skew;

  // Ages ("3 s ago") tick locally between snapshots; no request is made.
  function tickAges() {
    const now = serverNow();
    for (const el of document.querySelectorAll('[data-since]')) {
      el.textContent = fmtAgo(Math.max(0, now - Number(el.dataset.since)));
    }
  }
  setInterval(tickAges, 1000);

  function describeDevice(d) {
    if (d.kind === 'cpu') {
      const mem = d.memory_bytes ? `${fmtBytes(d.memory_bytes)} RAM` : '';
      const free = d.memory_available_bytes ? `${fmtBytes(d.memory_available_bytes)} free` : '';
      return [`CPU ${d.name || ''}`.trim(), d.cores ? `${d.cores} cores` : '', mem, free].filter(Boolean).join(' \u00b7 ');
    }
    const util = d.utilization_pct === null || d.utilization_pct === undefined ? '' : `${Math.round(d.utilization_pct)}% busy`;
    return [d.id, d.name, fmtBytes(d.memory_bytes), util].filter(Boolean).join(' \u00b7 ');
  }

  function renderCluster() {
    const snap = feed.snap;
    if (!snap) return;
    const queued = snap.models.reduce((n, m) => n + m.queue, 0);
    $('summary').textContent = [plural(snap.hives.length, 'hive'), plural(snap.workers.length, 'worker'),
      `${plural(snap.jobs_live, 'job')} running`, `${queued} queued`].join(' \u00b7 ');

    const hives = snap.hives.map((hv) => h('article', { class: `card ${hv.state}`, 'data-hive': hv.hive_id },
      h('div', { class: 'card-head' }, h('strong', { text: hv.hive_id }), badge(hv.state)),
      h('dl', {},
        h('dt', { text: 'Address' }), h('dd', { class: 'mono', text: hv.url }),
        h('dt', { text: 'Devices' }), h('dd', {}, (hv.devices || []).map((d) => h('div', { text: describeDevice(d) }))),
        h('dt', { text: 'Models' }), h('dd', { text: (hv.models || []).map((m) => m.alias || m.id).join(', ') || 'none' }),
        h('dt', { text: 'Workers' }), h('dd', { text: String(hv.workers.length) }),
        h('dt', { text: 'Heartbeat' }), h('dd', { 'data-since': hv.last_heartbeat_at, text: fmtAgo(serverNow() - hv.last_heartbeat_at) }),
      )));
    $('hives').replaceChildren(...(hives.length ? hives : [h('p', { class: 'empty' },
      'No hive has reported yet. Start one on a machine with ',
      h('code', { text: `rbee-hive --queen-url ${location.origin}` }), '.')]));

    const workers = snap.workers.map((w) => ({
      attrs: { 'data-worker': w.worker_id },
      cells: [
        h('span', { class: 'mono', text: w.worker_id }),
        w.hive_id,
        h('span', {}, (w.aliases && w.aliases[0]) || w.model, w.aliases && w.aliases.length ? h('span', { class: 'sub', text: w.model }) : null),
        w.device || '',
        h('span', {}, badge(w.hive_state === 'stale' ? 'stale' : w.state)),
        w.current_job ? jobLink(w.current_job) : h('span', { class: 'muted', text: 'idle' }),
        w.pid ? String(w.pid) : '',
      ],
    }));
    $('workers').replaceChildren(workers.length
      ? table([{ label: 'Worker' }, { label: 'Hive' }, { label: 'Model' }, { label: 'Device' }, { label: 'State' },
        { label: 'Current job' }, { label: 'PID', num: true }], workers)
      : h('p', { class: 'empty', text: 'No workers yet. The first prompt for a model starts one.' }));

    const models = snap.models.map((m) => ({
      attrs: { 'data-model': m.name },
      cells: [m.name, m.hives.join(', ') || '-', String(m.workers), String(m.queue)],
    }));
    $('queues').replaceChildren(models.length
      ? table([{ label: 'Model' }, { label: 'Hives' }, { label: 'Workers', num: true }, { label: 'Queued', num: true }], models)
      : h('p', { class: 'empty', text: 'No models known yet.' }));

    const jobs = snap.jobs.map((j) => ({
      attrs: { 'data-job': j.job_id },
      cells: [
        jobLink(j.job_id),
        j.operation,
        j.model ? h('span', {}, j.model, j.prompt ? h('span', { class: 'sub', text: j.prompt }) : null) : null,
        h('span', {}, badge(j.status), j.phase ? h('span', { class: 'sub', text: j.phase }) : null,
          j.error && j.error.kind !== j.status ? h('span', { class: 'sub', text: j.error.kind }) : null),
        j.tokens_out === null || j.tokens_out === undefined ? '' : String(j.tokens_out),
        fmtMs(j.duration_ms),
        h('span', { 'data-since': j.created_at, text: fmtAgo(serverNow() - j.created_at) }),
      ],
    }));
    $('jobs').replaceChildren(jobs.length
      ? table([{ label: 'Job' }, { label: 'Operation' }, { label: 'Model', clip: true }, { label: 'Outcome' },
        { label: 'Tokens', num: true }, { label: 'Duration', num: true }, { label: 'Submitted' }], jobs)
      : h('p', { class: 'empty', text: 'No jobs yet. Try the playground.' }));
  }

  // -- playground ------------------------------------------------------------

  const play = { jobId: null, ctrl: null, t0: 0, text: null };

  function renderModels() {
    const select = $('play-model');
    const models = feed.snap ? feed.snap.models : [];
    const names = models.map((m) => m.name);
    const current = select.value;
    if (select.options.length === names.length && [...select.options].every((o, i) => o.value === names[i])) return;
    select.replaceChildren(...models.map((m) => h('option', { value: m.name, text: m.name })));
    if (names.includes(current)) select.value = current;
    else if (models.length) select.value = (models.find((m) => m.workers) || models[0]).name;
    select.disabled = !models.length;
  }

  function narrationItem(data, t0) {
    const at = t0 && data.ts ? `+${fmtMs((data.ts - t0) * 1000)}` : '';
    return h('li', { class: data.level || 'info', 'data-action': data.action },
      h('span', { class: 't', text: at }), h('span', { class: 'who', text: data.actor || '' }),
      h('span', { class: 'what', text: data.human || data.action }));
  }

  function playStatus(text, state) {
    const el = $('play-status');
    el.replaceChildren(...[state ? badge(state) : null, ' ', text].filter(Boolean));
    if (play.jobId) el.append(' ', h('a', { href: `#/jobs/${play.jobId}`, text: 'job page' }));
  }

  function stickToBottom(el, fn) {
    const atBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
    fn();
    if (atBottom) el.scrollTop = el.scrollHeight;
  }

  async function runPrompt() {
    if (play.ctrl) return;
    const op = {
      operation: 'infer',
      model: $('play-model').value,
      prompt: $('play-prompt').value,
      max_tokens: Number($('play-max').value) || 128,
      temperature: Number($('play-temp').value),
    };
    if (!op.model || !op.prompt.trim()) return;
    play.jobId = null;
    play.text = document.createTextNode('');
    $('play-output').replaceChildren(play.text);
    $('play-narration').replaceChildren();
    $('play-run').disabled = true;
    playStatus('submitting');
    let created;
    try {
      created = await api('POST', '/v1/jobs', op);
    } catch (err) {
      $('play-run').disabled = false;
      if (!(err instanceof AuthError)) playStatus(err.message, 'failed');
      return;
    }
    play.jobId = created.job_id;
    play.t0 = Date.now() / 1000;
    $('play-cancel').disabled = false;
    playStatus('running', 'running');
    const ctrl = new AbortController();
    play.ctrl = ctrl;
    let lastId = 0;
    let ended = false;
    let tokens = 0;
    for (let attempt = 0; !ended && attempt < 4 && !ctrl.signal.aborted; attempt += 1) {
      try {
        // Closing the tab cancels the job, as Ctrl-C does in the terminal.
        await readSSE(`${created.sse_url}?cancel_on_disconnect=true`, {
          signal: ctrl.signal,
          lastEventId: lastId,
          onEvent: (e) => {
            if (e.id) lastId = Number(e.id);
            if (e.data === '[DONE]') return;
            const data = JSON.parse(e.data);
            if (e.event === 'token') {
              tokens += 1;
              stickToBottom($('play-output'), () => play.text.appendData(data.t));
              if (tokens === 1 || tokens % 8 === 0) playStatus(plural(tokens, 'token'), 'running');
            } else if (e.event === 'narration') {
              if (data.action === 'job_start' && data.actor === 'queen' && data.ts) play.t0 = data.ts;
              stickToBottom($('play-narration'), () => $('play-narration').append(narrationItem(data, play.t0)));
            } else if (e.event === 'progress' && data.action === 'queue') {
              playStatus(`queued: position ${data.done} of ${data.total}`, 'queued');
            } else if (e.event === 'end') {
              ended = true;
              const parts = [plural(data.tokens_out ?? tokens, 'token'), fmtMs(data.duration_ms)];
              if (data.tokens_per_s) parts.push(`${data.tokens_per_s} tokens/s`);
              if (data.error) parts.push(data.error.message);
              playStatus(parts.filter(Boolean).join(' \u00b7 '), data.status);
              $('play-output').dataset.status = data.status;
            }
          },
        });
      } catch (err) {
        if (err instanceof AuthError) break;
        await sleep(300);
      }
    }
    if (!ended && !ctrl.signal.aborted) playStatus('the stream closed before the job ended', 'failed');
    play.ctrl = null;
    $('play-run').disabled = false;
    $('play-cancel').disabled = true;
  }

  async function cancelPrompt() {
    if (!play.jobId || !play.ctrl) return;
    $('play-cancel').disabled = true;
    playStatus('cancelling', 'running');
    try {
      await api('DELETE', `/v1/jobs/${play.jobId}`);
    } catch (err) {
      if (!(err instanceof AuthError)) playStatus(err.message, 'failed');
    }
  }

  $('play-form').addEventListener('submit', (ev) => { ev.preventDefault(); runPrompt(); });
  $('play-cancel').addEventListener('click', cancelPrompt);
  $('play-prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runPrompt(); }
  });

  // -- job page --------------------------------------------------------------

  const job = { id: null, ctrl: null, summary: null, events: [], firstTokenAt: null, skew: null, pending: false, error: null };

  const MILESTONES = {
    job_start: 'Started',
    route_job: 'Routed',
    infer_start: 'Inference requested',
    infer_schedule: 'Scheduling',
    infer_queued: 'Queued',
    infer_spawn: 'Spawning a worker',
    infer_spawned: 'Worker started',
    infer_worker: 'Worker chosen',
    infer_dispatch: 'Dispatched',
    infer_retry: 'Retrying',
  };

  function openJob(id) {
    if (job.id === id) { renderJob(); return; }
    if (job.ctrl) job.ctrl.abort();
    Object.assign(job, { id, ctrl: new AbortController(), summary: null, events: [], firstTokenAt: null, skew: null, error: null });
    renderJob();
    loadJob(id, job.ctrl);
  }

  async function loadJob(id, ctrl) {
    try {
      job.summary = await api('GET', `/v1/jobs/${encodeURIComponent(id)}`);
    } catch (err) {
      if (ctrl !== job.ctrl) return;
      job.error = err instanceof HttpError && err.status === 404 ? `No job ${id} is known to this queen.` : String(err.message || err);
      renderJob();
      return;
    }
    let lastId = 0;
    let ended = false;
    for (let attempt = 0; !ended && attempt < 4 && !ctrl.signal.aborted; attempt += 1) {
      try {
        await readSSE(`/v1/jobs/${encodeURIComponent(id)}/stream`, {
          signal: ctrl.signal,
          lastEventId: lastId,
          onEvent: (e) => {
            if (ctrl !== job.ctrl || e.data === '[DONE]') return;
            if (e.id) lastId = Number(e.id);
            const data = JSON.parse(e.data);
            const now = Date.now() / 1000;
            if (e.event === 'narration' && data.actor === 'queen' && data.ts) {
              // The smallest arrival delay seen is the best guess of the clock offset.
              const skew = now - data.ts;
              if (job.skew === null || skew < job.skew) job.skew = skew;
            }
            if (e.event === 'token' && job.firstTokenAt === null) job.firstTokenAt = now - (job.skew ?? 0);
            if (e.event === 'end') ended = true;
            job.events.push({ id: Number(e.id), kind: e.event, data });
            scheduleJobRender();
          },
        });
      } catch (err) {
        if (err instanceof AuthError || ctrl.signal.aborted) return;
        await sleep(300);
      }
    }
  }

  function scheduleJobRender() {
    if (job.pending) return;
    job.pending = true;
    requestAnimationFrame(() => { job.pending = false; renderJob(); });
  }

  function deriveTimeline() {
    const s = job.summary || {};
    const t0 = s.created_at;
    const steps = [{ step: 'Submitted', ms: 0, detail: s.operation || '' }];
    let end = null;
    let firstToken = null;
    for (const ev of job.events) {
      if (ev.kind === 'narration' && ev.data.actor === 'queen' && MILESTONES[ev.data.action]) {
        steps.push({ step: MILESTONES[ev.data.action], ms: (ev.data.ts - t0) * 1000, detail: ev.data.human, action: ev.data.action });
      } else if (ev.kind === 'token' && !firstToken) {
        firstToken = { step: 'First token', ms: job.firstTokenAt ? (job.firstTokenAt - t0) * 1000 : null, approx: true, detail: '' };
        steps.push(firstToken);
      } else if (ev.kind === 'end') {
        end = ev.data;
      }
    }
    if (end) {
      if (firstToken && end.ttft_ms !== undefined) { firstToken.ms = end.ttft_ms; firstToken.approx = false; }
      const parts = [];
      if (end.tokens_out !== undefined) parts.push(plural(end.tokens_out, 'token'));
      if (end.stop_reason) parts.push(`stopped by ${end.stop_reason}`);
      if (end.error) parts.push(`${end.error.kind}: ${end.error.message}`);
      steps.push({ step: `End: ${end.status.replace('_', ' ')}`, ms: end.duration_ms, detail: parts.join(' \u00b7 '), end: end.status });
    }
    return { steps, end };
  }

  function eventRows() {
    const rows = [];
    const t0 = job.summary ? job.summary.created_at : 0;
    let run = null;
    for (const ev of job.events) {
      if (ev.kind === 'token') {
        if (run) { run.last = ev.id; run.count += 1; run.text += ev.data.t; continue; }
        run = { kind: 'token', first: ev.id, last: ev.id, count: 1, text: ev.data.t };
        rows.push(run);
        continue;
      }
      run = null;
      rows.push(ev);
    }
    return rows.map((ev) => {
      if (ev.kind === 'token') {
        const preview = ev.text.length > 120 ? `${ev.text.slice(0, 119)}\u2026` : ev.text;
        return { attrs: { 'data-kind': 'token' }, cells: [ev.first === ev.last ? String(ev.first) : `${ev.first}\u2013${ev.last}`, '', 'token', '', `${plural(ev.count, 'token')}: ${preview}`] };
      }
      const d = ev.data;
      let detail = '';
      let who = '';
      if (ev.kind === 'narration') { detail = d.human; who = `${d.actor} ${d.action}`; }
      else if (ev.kind === 'progress') { detail = `${d.action}: ${d.done}${d.total ? ` of ${d.total}` : ''} ${d.unit || ''}`; }
      else if (ev.kind === 'end') { detail = `${d.status}${d.error ? ` (${d.error.kind}: ${d.error.message})` : ''}, ${fmtMs(d.duration_ms)}`; }
      else { detail = JSON.stringify(d).slice(0, 200); }
      const at = ev.kind === 'narration' && d.ts && t0 ? `+${fmtMs((d.ts - t0) * 1000)}` : '';
      return { attrs: { 'data-kind': ev.kind }, cells: [String(ev.id), at, ev.kind, who, detail] };
    });
  }

  function renderJob() {
    if ($('view-job').hidden) return;
    const s = job.summary;
    $('job-error').hidden = !job.error;
    $('job-error').textContent = job.error || '';
    const { steps, end } = deriveTimeline();
    const status = end ? end.status : (s && s.status) || 'loading';
    $('job-title').replaceChildren(h('span', { text: job.id || '' }), badge(status));
    const payload = (s && s.payload) || {};
    const infer = job.events.find((e) => e.kind === 'narration' && e.data.action === 'infer_start');
    const facts = [
      ['Operation', s && s.operation],
      ['Model', payload.model || (infer && infer.data.model)],
      ['Submitted', s && s.created_at ? new Date(s.created_at * 1000).toLocaleString() : ''],
      ['Duration', end ? fmtMs(end.duration_ms) : ''],
      ['First token', end && end.ttft_ms !== undefined ? fmtMs(end.ttft_ms) : ''],
      ['Tokens', end && end.tokens_out !== undefined ? String(end.tokens_out) : ''],
      ['Speed', end && end.tokens_per_s ? `${end.tokens_per_s} tokens/s` : ''],
      ['Worker', end && end.worker_id ? `${end.worker_id} on ${end.hive_id}` : ''],
    ].filter(([, v]) => v);
    $('job-facts').replaceChildren(...facts.map(([k, v]) => h('span', {}, h('b', { text: k }), v)));
    if (payload.prompt) $('job-facts').append(h('span', {}, h('b', { text: 'Prompt' }), payload.prompt.length > 160 ? `${payload.prompt.slice(0, 159)}\u2026` : payload.prompt));

    const total = Math.max(1, ...steps.map((st) => st.ms || 0));
    $('job-timeline').replaceChildren(...steps.map((st) => {
      const bar = h('i');
      bar.style.width = `${Math.min(100, ((st.ms || 0) / total) * 100)}%`;
      return h('li', { class: st.end ? `end ${st.end}` : null, 'data-step': st.step },
        h('span', { class: 'step', text: st.step }),
        h('span', { class: 'at', text: st.ms === null || st.ms === undefined ? '' : `${st.approx ? '\u2248' : ''}+${fmtMs(Math.max(0, st.ms))}` }),
        h('span', { class: 'detail', text: st.detail || '' }),
        h('span', { class: 'bar' }, bar));
    }));

    const text = job.events.filter((e) => e.kind === 'token').map((e) => e.data.t).join('') || (s && s.text) || '';
    $('job-output').textContent = text;
    $('job-output').hidden = !text;
    $('job-output').previousElementSibling.hidden = !text;
    const rows = eventRows();
    $('job-events').replaceChildren(rows.length
      ? table([{ label: '#', num: true }, { label: 'At', num: true }, { label: 'Kind' }, { label: 'Step' }, { label: 'Detail' }], rows)
      : h('p', { class: 'empty', text: job.error ? 'No events.' : 'Loading events...' }));
  }

  // -- start -----------------------------------------------------------------

  window.addEventListener('hashchange', route);

  (async () => {
    try {
      await api('GET', '/v1/info');
    } catch (err) {
      if (err instanceof AuthError) return; // the login view is up
      setConn('offline', 'queen unreachable');
    }
    startFeed();
    route();
  })();
})();
