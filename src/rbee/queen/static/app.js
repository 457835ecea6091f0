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

  // A length of time in seconds, as people say it: "45 s", "4 min 10 s", "2 h 5 min".
  function fmtDur(seconds) {
    const t = Math.max(0, Math.floor(seconds));
    if (t < 60) return `${t} s`;
    if (t < 3600) return t % 60 ? `${Math.floor(t / 60)} min ${t % 60} s` : `${t / 60} min`;
    return `${Math.floor(t / 3600)} h ${Math.floor((t % 3600) / 60)} min`;
  }

  // A keep-alive setting in words (-1: for ever; 0: stopped after its job).
  function fmtKeepAlive(s) {
    if (s === null || s === undefined) return '';
    if (s < 0) return 'for ever';
    if (s === 0) return 'stopped after its job';
    return fmtDur(s);
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
    if (hash === '#/play' || hash === '#/chat') { show('play'); setMode(hash === '#/chat' ? 'chat' : 'text'); return; }
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
    for (const el of document.querySelectorAll('[data-idle-since]')) el.textContent = idleText(Number(el.dataset.idleSince), now);
    for (const el of document.querySelectorAll('[data-unloads-at]')) el.textContent = unloadText(Number(el.dataset.unloadsAt), now);
  }
  const idleText = (since, now) => `idle ${fmtDur(now - since)}`;
  const unloadText = (at, now) => (at - now >= 1 ? `unloads in ${fmtDur(at - now)}` : 'unloading now');
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

  // RAM (and the hive's cap), then VRAM per GPU: "free of total", with a meter of what is used.
  function describeMemory(mem) {
    const line = (label, free, total, extra) => h('div', { class: 'mem' },
      h('span', { text: `${label}: ${fmtBytes(free) || '0 B'} free of ${fmtBytes(total)}${extra || ''}` }),
      total > 0 ? h('meter', { min: 0, max: total, value: Math.max(0, total - free), 'aria-label': `${label} in use` }) : null);
    const rows = [];
    if (typeof mem.total_bytes === 'number') {
      const cap = mem.limit_bytes ? ` \u00b7 workers capped at ${fmtBytes(mem.limit_bytes)}` : '';
      rows.push(line('RAM', mem.available_bytes || 0, mem.total_bytes, cap));
    }
    for (const g of mem.gpus || []) {
      rows.push(line(`GPU ${g.index}${g.name ? ` ${g.name}` : ''}`, g.free_bytes || 0, g.total_bytes || 0));
    }
    return rows;
  }

  // A worker's unload time: a countdown, "never", or nothing said while it works.
  function unloadCell(w) {
    if (w.state === 'busy' || w.current_job) return h('span', { class: 'muted', text: 'busy' });
    if (typeof w.unloads_at === 'number') {
      return h('span', { 'data-unloads-at': w.unloads_at, title: `kept ${fmtKeepAlive(w.keep_alive_s) || 'for its hive\'s default'} once idle`, text: unloadText(w.unloads_at, serverNow()) });
    }
    if (typeof w.keep_alive_s === 'number' && w.keep_alive_s < 0) return h('span', { text: 'never' });
    if (w.keep_alive_s === 0) return h('span', { text: 'after its job' });
    return '';
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
        hv.memory ? [h('dt', { text: 'Memory' }), h('dd', { 'data-memory': '' }, describeMemory(hv.memory))] : null,
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
        w.slots ? h('span', { 'data-slots': '', text: `${w.busy_slots || 0}/${w.slots}` }) : '',
        fmtBytes(w.memory_bytes),
        w.current_job ? jobLink(w.current_job)
          : typeof w.idle_since === 'number' ? h('span', { class: 'muted', 'data-idle-since': w.idle_since, text: idleText(w.idle_since, serverNow()) })
            : h('span', { class: 'muted', text: 'idle' }),
        unloadCell(w),
        w.pid ? String(w.pid) : '',
      ],
    }));
    $('workers').replaceChildren(workers.length
      ? table([{ label: 'Worker' }, { label: 'Hive' }, { label: 'Model' }, { label: 'Device' }, { label: 'State' },
        { label: 'Slots busy', num: true }, { label: 'Memory', num: true }, { label: 'Job or idle' }, { label: 'Unload' },
        { label: 'PID', num: true }], workers)
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
  //
  // Two modes over one model picker and one narration panel: text (a prompt to
  // continue) and chat (a conversation sent as `messages` on every turn).

  const play = { jobId: null, ctrl: null, t0: 0, text: null };
  const chat = { turns: [], jobId: null, ctrl: null, current: null, template: null, worker: null };

  function selectedModel() {
    const name = $('play-model').value;
    return (feed.snap ? feed.snap.models : []).find((m) => m.name === name) || null;
  }

  function workersOf(model) {
    if (!feed.snap || !model) return [];
    return feed.snap.workers.filter((w) => w.model === model.id || w.model === model.name || (w.aliases || []).includes(model.name));
  }

  function renderModels() {
    const select = $('play-model');
    const models = feed.snap ? feed.snap.models : [];
    const names = models.map((m) => m.name);
    const current = select.value;
    if (!(select.options.length === names.length && [...select.options].every((o, i) => o.value === names[i]))) {
      select.replaceChildren(...models.map((m) => h('option', { value: m.name, text: m.name })));
      if (names.includes(current)) select.value = current;
      else if (models.length) select.value = (models.find((m) => m.workers) || models[0]).name;
      select.disabled = !models.length;
    }
    renderModelInfo();
  }

  // What is known of the chosen model: its chat template, context, and the workers that hold it.
  function renderModelInfo() {
    const m = selectedModel();
    const el = $('play-model-info');
    if (!m) { el.replaceChildren(); return; }
    const parts = [];
    if (m.chat_template) parts.push(h('span', { 'data-chat-template': m.chat_template }, 'chat template ', h('b', { text: m.chat_template })));
    if (m.context_length) parts.push(`context ${m.context_length.toLocaleString('en')} tokens`);
    if (m.quantization) parts.push(m.quantization);
    const loaded = workersOf(m);
    if (!loaded.length) parts.push('not loaded: the first job starts a worker');
    for (const w of loaded) {
      const bits = [`loaded on ${w.worker_id}`];
      if (w.slots) bits.push(`${w.busy_slots || 0}/${w.slots} slots busy`);
      if (typeof w.keep_alive_s === 'number') bits.push(`kept ${fmtKeepAlive(w.keep_alive_s)}`);
      parts.push(h('span', {}, bits.join(', '), typeof w.unloads_at === 'number' && !w.current_job
        ? [', ', h('span', { 'data-unloads-at': w.unloads_at, text: unloadText(w.unloads_at, serverNow()) })] : null));
    }
    const kids = [];
    parts.forEach((p, i) => { if (i) kids.push(' \u00b7 '); kids.push(p); });
    el.replaceChildren(...kids);
    renderTemplate();
  }

  function renderTemplate() {
    const el = $('chat-template');
    const m = selectedModel();
    if (chat.template) {
      el.dataset.source = 'worker';
      el.textContent = `template ${chat.template.name} (used by ${chat.template.worker || 'the worker'})`;
    } else if (m && m.chat_template) {
      el.dataset.source = 'model';
      el.textContent = `template ${m.chat_template}`;
    } else {
      delete el.dataset.source;
      el.textContent = '';
    }
  }

  function narrationItem(data, t0) {
    const at = t0 && data.ts ? `+${fmtMs((data.ts - t0) * 1000)}` : '';
    return h('li', { class: data.level || 'info', 'data-action': data.action },
      h('span', { class: 't', text: at }), h('span', { class: 'who', text: data.actor || '' }),
      h('span', { class: 'what', text: data.human || data.action }));
  }

  function setStatus(el, text, state, jobId) {
    el.replaceChildren(...[state ? badge(state) : null, ' ', text].filter(Boolean));
    if (jobId) el.append(' ', h('a', { href: `#/jobs/${jobId}`, text: 'job page' }));
  }

  function playStatus(text, state) { setStatus($('play-status'), text, state, play.jobId); }

  function stickToBottom(el, fn) {
    const atBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
    fn();
    if (atBottom) el.scrollTop = el.scrollHeight;
  }

  // The settings both modes share; null (and a message) when one is not valid.
  function inferSettings(statusEl) {
    const op = {
      operation: 'infer',
      model: $('play-model').value,
      max_tokens: Number($('play-max').value) || 128,
      temperature: Number($('play-temp').value),
    };
    const keep = $('play-keep').value.trim();
    if (keep !== '') {
      const k = Number(keep);
      if (!Number.isFinite(k) || (k < 0 && k !== -1)) {
        setStatus(statusEl, 'Keep loaded: -1 (for ever), 0 (stop after the job) or a number of seconds', 'failed');
        $('play-keep').focus();
        return null;
      }
      op.keep_alive = k;
    }
    return op.model ? op : null;
  }

  // Submits an infer job and follows its stream until its end (reconnecting from the last id).
  // run: onCreated(job), onToken(data, n), onNarration(data), onQueued(progress), onEnd(end), onError(message).
  async function streamJob(op, run) {
    let created;
    try {
      created = await api('POST', '/v1/jobs', op);
    } catch (err) {
      if (!(err instanceof AuthError)) run.onError(err.message);
      return false;
    }
    const ctrl = new AbortController();
    run.onCreated(created, ctrl);
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
            if (e.data === '[DONE]' || ended) return;
            const data = JSON.parse(e.data);
            if (e.event === 'token') {
              tokens += 1;
              run.onToken(data, tokens);
            } else if (e.event === 'narration') {
              run.onNarration(data);
            } else if (e.event === 'progress' && data.action === 'queue') {
              run.onQueued(data);
            } else if (e.event === 'end') {
              ended = true;
              run.onEnd(data, tokens);
            }
          },
        });
      } catch (err) {
        if (err instanceof AuthError) break;
        await sleep(300);
      }
    }
    if (!ended && !ctrl.signal.aborted) run.onError('the stream closed before the job ended');
    return ended;
  }

  function endSummary(data, tokens) {
    const parts = [plural(data.tokens_out ?? tokens, 'token'), fmtMs(data.duration_ms)];
    if (data.tokens_per_s) parts.push(`${data.tokens_per_s} tokens/s`);
    if (data.error) parts.push(data.error.message);
    return parts.filter(Boolean).join(' \u00b7 ');
  }

  function narrate(data) {
    if (data.action === 'job_start' && data.actor === 'queen' && data.ts) play.t0 = data.ts;
    stickToBottom($('play-narration'), () => $('play-narration').append(narrationItem(data, play.t0)));
  }

  async function runPrompt() {
    if (play.ctrl || chat.ctrl) return;
    const op = inferSettings($('play-status'));
    if (!op) return;
    op.prompt = $('play-prompt').value;
    if (!op.prompt.trim()) return;
    play.jobId = null;
    play.text = document.createTextNode('');
    $('play-output').replaceChildren(play.text);
    delete $('play-output').dataset.status;
    $('play-narration').replaceChildren();
    $('play-run').disabled = true;
    playStatus('submitting');
    await streamJob(op, {
      onCreated: (created, ctrl) => {
        play.jobId = created.job_id;
        play.ctrl = ctrl;
        play.t0 = Date.now() / 1000;
        $('play-cancel').disabled = false;
        playStatus('running', 'running');
      },
      onToken: (data, n) => {
        stickToBottom($('play-output'), () => play.text.appendData(data.t));
        if (n === 1 || n % 8 === 0) playStatus(plural(n, 'token'), 'running');
      },
      onNarration: narrate,
      onQueued: (data) => playStatus(`queued: position ${data.done} of ${data.total}`, 'queued'),
      onEnd: (data, tokens) => {
        playStatus(endSummary(data, tokens), data.status);
        $('play-output').dataset.status = data.status;
      },
      onError: (message) => playStatus(message, 'failed'),
    });
    play.ctrl = null;
    $('play-run').disabled = false;
    $('play-cancel').disabled = true;
  }

  async function cancelJob(jobId, statusEl) {
    try {
      await api('DELETE', `/v1/jobs/${jobId}`);
    } catch (err) {
      if (!(err instanceof AuthError)) setStatus(statusEl, err.message, 'failed', jobId);
    }
  }

  async function cancelPrompt() {
    if (!play.jobId || !play.ctrl) return;
    $('play-cancel').disabled = true;
    playStatus('cancelling', 'running');
    await cancelJob(play.jobId, $('play-status'));
  }

  // -- chat ------------------------------------------------------------------

  const ROLE_LABEL = { system: 'System', user: 'You', assistant: 'Assistant' };

  function turnElement(turn) {
    turn.body = document.createTextNode(turn.content);
    turn.note = h('span', { class: 'turn-note' });
    turn.el = h('li', { class: 'turn', 'data-role': turn.role },
      h('div', { class: 'turn-head' }, h('span', { class: 'turn-role', text: ROLE_LABEL[turn.role] || turn.role }), turn.note),
      h('div', { class: 'turn-text' }, turn.body));
    return turn.el;
  }

  function setTurnStatus(turn, status, note, jobId) {
    turn.status = status;
    turn.el.dataset.status = status;
    turn.note.replaceChildren(...[status && status !== 'completed' ? badge(status) : null, note ? ` ${note}` : null,
      jobId ? [' ', h('a', { href: `#/jobs/${jobId}`, text: 'job' })] : null].flat().filter(Boolean));
  }

  function renderChatEmpty() {
    $('chat-empty').hidden = chat.turns.length > 0;
  }

  function chatStatus(text, state) { setStatus($('chat-status'), text, state, chat.jobId); }

  // The conversation as the model is sent it: the system prompt, then every turn that has text
  // (a stopped answer keeps what it said; one that failed or timed out is left out).
  function chatMessages() {
    const messages = [];
    const system = $('chat-system').value.trim();
    if (system) messages.push({ role: 'system', content: system });
    for (const t of chat.turns) {
      if (!t.content || (t.role === 'assistant' && t.status !== 'completed' && t.status !== 'cancelled')) continue;
      messages.push({ role: t.role, content: t.content });
    }
    return messages;
  }

  function chatBusy(busy) {
    $('chat-send').disabled = busy;
    $('chat-stop').disabled = !busy;
  }

  async function sendChat() {
    if (chat.ctrl || play.ctrl) return;
    const text = $('chat-input').value;
    if (!text.trim()) { $('chat-input').focus(); return; }
    const op = inferSettings($('chat-status'));
    if (!op) return;
    const user = { role: 'user', content: text, status: 'completed' };
    chat.turns.push(user);
    op.messages = chatMessages();
    const answer = { role: 'assistant', content: '', status: 'running' };
    const log = $('chat-log');
    stickToBottom(log, () => log.append(turnElement(user), turnElement(answer)));
    chat.turns.push(answer);
    setTurnStatus(answer, 'running', 'waiting for the model');
    renderChatEmpty();
    $('chat-input').value = '';
    chat.jobId = null;
    chat.current = answer;
    $('play-narration').replaceChildren();
    chatBusy(true);
    chatStatus('submitting');
    const ok = await streamJob(op, {
      onCreated: (created, ctrl) => {
        chat.jobId = created.job_id;
        chat.ctrl = ctrl;
        answer.jobId = created.job_id;
        answer.el.dataset.job = created.job_id;
        play.t0 = Date.now() / 1000;
        chatStatus('running', 'running');
      },
      onToken: (data, n) => {
        answer.content += data.t;
        stickToBottom(log, () => answer.body.appendData(data.t));
        if (n === 1) setTurnStatus(answer, 'running', '', answer.jobId);
        if (n === 1 || n % 8 === 0) chatStatus(plural(n, 'token'), 'running');
      },
      onNarration: (data) => {
        if (data.actor === 'queen' && data.action === 'infer_worker') chat.worker = data.worker_id;
        if (typeof data.chat_template === 'string' && data.chat_template) {
          // The worker says which template it rendered this chat with (infer_start).
          chat.template = { name: data.chat_template, worker: data.worker_id || chat.worker || null };
          renderTemplate();
        }
        narrate(data);
      },
      onQueued: (data) => chatStatus(`queued: position ${data.done} of ${data.total}`, 'queued'),
      onEnd: (data, tokens) => {
        const note = data.status === 'cancelled' ? 'stopped' : data.error ? data.error.message : '';
        setTurnStatus(answer, data.status, note, answer.jobId);
        chatStatus(endSummary(data, tokens), data.status);
      },
      onError: (message) => {
        if (!chat.jobId) {
          // Refused at submission: the message goes back into the box, as if never sent.
          chat.turns.splice(chat.turns.indexOf(user), 2);
          user.el.remove();
          answer.el.remove();
          if (!$('chat-input').value) $('chat-input').value = text;
          renderChatEmpty();
        } else {
          setTurnStatus(answer, 'failed', message, answer.jobId);
        }
        chatStatus(message, 'failed');
      },
    });
    if (!ok && answer.status === 'running') setTurnStatus(answer, 'failed', '', answer.jobId);
    chat.ctrl = null;
    chat.current = null;
    chatBusy(false);
    if (!$('view-play').hidden) $('chat-input').focus({ preventScroll: true });
  }

  async function stopChat() {
    if (!chat.jobId || !chat.ctrl) return;
    $('chat-stop').disabled = true;
    chatStatus('stopping', 'running');
    await cancelJob(chat.jobId, $('chat-status'));
  }

  async function clearChat() {
    if (chat.ctrl) await stopChat();
    chat.turns = [];
    chat.template = null;
    $('chat-log').replaceChildren();
    renderChatEmpty();
    renderTemplate();
    if (!chat.ctrl) chatStatus('');
    $('chat-input').focus({ preventScroll: true });
  }

  function setMode(mode) {
    for (const a of document.querySelectorAll('[data-mode]')) {
      if (a.dataset.mode === mode) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    $('view-play').dataset.mode = mode;
    $('play-form').hidden = mode !== 'text';
    $('text-panel').hidden = mode !== 'text';
    $('chat-panel').hidden = mode !== 'chat';
    (mode === 'chat' ? $('chat-input') : $('play-prompt')).focus({ preventScroll: true });
  }

  $('play-form').addEventListener('submit', (ev) => { ev.preventDefault(); runPrompt(); });
  $('play-cancel').addEventListener('click', cancelPrompt);
  $('play-prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); runPrompt(); }
  });
  $('play-model').addEventListener('change', () => { chat.template = null; renderModelInfo(); });
  $('chat-form').addEventListener('submit', (ev) => { ev.preventDefault(); sendChat(); });
  $('chat-stop').addEventListener('click', stopChat);
  $('chat-clear').addEventListener('click', clearChat);
  $('chat-input').addEventListener('keydown', (ev) => {
    // Enter sends; Shift+Enter is a new line; an input method composing text keeps its Enter.
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendChat(); }
  });
  renderChatEmpty();

  // -- job page --------------------------------------------------------------

  const job = { id: null, ctrl: null, summary: null, events: [], firstTokenAt: null, skew: null, pending: false, error: null, ended: false };

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
    Object.assign(job, { id, ctrl: new AbortController(), summary: null, events: [], firstTokenAt: null, skew: null, error: null, ended: false });
    $('job-input').dataset.for = '';
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
            if (e.event === 'end') { ended = true; job.ended = true; }
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

  // The waterfall: the job's journey as bars on one time axis, each from its start to where the
  // next step begins. Steps come from the narration's wall-clock `ts` (queen and worker), the
  // first token from the end's `ttft_ms` (or the token's arrival while the job runs). Each mark
  // is kept at or after the one before it in the log, so a worker whose clock runs behind the
  // queen's cannot draw a step before the one that caused it.
  const WATERFALL = {
    'queen infer_schedule': 'Scheduling',
    'queen infer_queued': 'Queued',
    'queen infer_spawn': 'Starting a worker',
    'queen infer_worker': 'Sending to the worker',
    'worker infer_queued': 'Waiting for a slot',
    'worker infer_start': 'Prompt evaluation',
    'queen infer_retry': 'Retrying',
  };

  function deriveWaterfall() {
    const s = job.summary || {};
    const t0 = s.created_at;
    const marks = [];
    let seen = new Set();
    let floor = 0;
    let end = null;
    let sawToken = false;
    const mark = (step, ms) => {
      if (seen.has(step)) return;
      seen.add(step);
      floor = Math.max(floor, Number.isFinite(ms) ? ms : floor);
      marks.push({ step, start: floor });
    };
    for (const ev of job.events) {
      if (ev.kind === 'narration' && t0) {
        const step = WATERFALL[`${ev.data.actor} ${ev.data.action}`];
        if (!step || typeof ev.data.ts !== 'number') continue;
        if (step === 'Retrying') seen = new Set(sawToken ? ['Prompt evaluation'] : []);
        mark(step, (ev.data.ts - t0) * 1000);
        if (step === 'Retrying') seen.delete('Retrying');
      } else if (ev.kind === 'token' && !seen.has('Generation')) {
        if (!seen.has('Prompt evaluation') && !sawToken) mark('Prompt evaluation', floor);
        sawToken = true;
        const approx = job.firstTokenAt && t0 ? (job.firstTokenAt - t0) * 1000 : floor;
        mark('Generation', approx);
      } else if (ev.kind === 'end') {
        end = ev.data;
      }
    }
    // Scheduling starts when the job does; a wait before it (the queen busy) is a bar of its own.
    if (marks.length && marks[0].start < 50) marks[0].start = 0;
    else marks.unshift({ step: marks.length ? 'Accepted' : 'Running', start: 0 });
    const gen = marks.find((m) => m.step === 'Generation');
    if (end && gen && typeof end.ttft_ms === 'number') {
      const before = marks[marks.indexOf(gen) - 1];
      gen.start = Math.max(before ? before.start : 0, end.ttft_ms);
    }
    const total = end && typeof end.duration_ms === 'number' ? end.duration_ms
      : t0 ? Math.max(floor, (serverNow() - t0) * 1000) : floor;
    const bars = marks.map((m, i) => ({ ...m, end: Math.max(m.start, i + 1 < marks.length ? marks[i + 1].start : total) }));
    for (const b of bars) b.end = Math.min(b.end, Math.max(total, b.start));
    return { bars, total, end, ttft: end && typeof end.ttft_ms === 'number' ? end.ttft_ms : gen ? gen.start : null };
  }

  function renderWaterfall() {
    const { bars, total, end, ttft } = deriveWaterfall();
    const el = $('job-waterfall');
    if (!job.summary || !job.events.length) { el.replaceChildren(); return; }
    const span = Math.max(total, 1);
    const pct = (ms) => `${Math.min(100, Math.max(0, (ms / span) * 100))}%`;
    const rows = bars.map((b, i) => {
      const last = i === bars.length - 1;
      const bar = h('span', { class: `wf-bar${last && !end ? ' live' : ''}${last && end ? ` ${end.status}` : ''}` });
      bar.style.left = pct(b.start);
      bar.style.width = pct(b.end - b.start);
      return h('li', { class: 'wf-row', 'data-step': b.step, 'data-start-ms': b.start.toFixed(1), 'data-end-ms': b.end.toFixed(1) },
        h('span', { class: 'wf-label', text: b.step }),
        h('span', { class: 'wf-track', 'aria-hidden': 'true' }, bar),
        h('span', { class: 'wf-time' }, fmtMs(b.end - b.start) || '0 ms',
          h('span', { class: 'sub', text: `from +${fmtMs(b.start) || '0 ms'}${last && !end ? ', running' : ''}` })));
    });
    const axis = h('div', { class: 'wf-axis', 'aria-hidden': 'true' },
      h('span', { class: 'wf-label' }),
      h('span', { class: 'wf-track' }, ...[0, 0.5, 1].map((f) => {
        const tick = h('span', { class: `wf-tick${f === 1 ? ' right' : ''}`, text: fmtMs(span * f) || '0 ms' });
        tick.style.left = `${f * 100}%`;
        return tick;
      }), ttft !== null && ttft > 0 ? (() => {
        const ft = h('span', { class: 'wf-ttft', title: 'first token', text: `first token +${fmtMs(ttft)}` });
        ft.style.left = pct(ttft);
        return ft;
      })() : null),
      h('span', { class: 'wf-time' }));
    el.replaceChildren(h('ol', { class: 'wf-rows', 'aria-label': 'Steps of the job, each with its duration' }, rows), axis);
  }

  // What the job was asked: an infer's prompt, or its chat as turns.
  function renderInput() {
    const payload = (job.summary && job.summary.payload) || null;
    const box = $('job-input');
    const title = $('job-input-title');
    const shown = !!(payload && (typeof payload.prompt === 'string' || Array.isArray(payload.messages)));
    box.hidden = !shown;
    title.hidden = !shown;
    if (!shown || box.dataset.for === job.id) return;
    box.dataset.for = job.id;
    if (Array.isArray(payload.messages)) {
      title.textContent = `Chat (${plural(payload.messages.length, 'message')})`;
      box.replaceChildren(h('ol', { class: 'chat-log', 'aria-label': 'Messages' }, payload.messages.map((m) => {
        const turn = { role: m.role, content: String(m.content ?? '') };
        return turnElement(turn);
      })));
    } else {
      title.textContent = 'Prompt';
      box.replaceChildren(h('pre', { class: 'output prompt', text: payload.prompt }));
    }
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
    const input = payload;
    const used = job.events.find((e) => e.kind === 'narration' && typeof e.data.chat_template === 'string');
    if (used) facts.push(['Chat template', used.data.chat_template]);
    if (typeof input.keep_alive === 'number') facts.push(['Keep loaded', fmtKeepAlive(input.keep_alive)]);
    $('job-facts').replaceChildren(...facts.map(([k, v]) => h('span', {}, h('b', { text: k }), v)));
    if (typeof input.prompt === 'string') $('job-facts').append(h('span', { class: 'fact-prompt' }, h('b', { text: 'Prompt' }), input.prompt.length > 160 ? `${input.prompt.slice(0, 159)}\u2026` : input.prompt));
    renderInput();
    renderWaterfall();

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

  // A running job's last bar grows with the clock, not only when an event arrives.
  setInterval(() => {
    if (!$('view-job').hidden && job.summary && !job.ended && !job.error) renderWaterfall();
  }, 500);

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
