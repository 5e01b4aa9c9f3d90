// pacs-agent console: the little interaction the server-rendered pages need.
// Every change goes through the JSON API with the session's CSRF token. Data from the API is
// put into the page with textContent only (never innerHTML): DICOM text stays text.
(() => {
  'use strict';

  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || '';
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const CLASSES = ['stat', 'urgent', 'routine', 'offpeak'];
  const canOperate = ['operator', 'admin'].includes(document.body.dataset.role);

  // --- DOM helpers (text only) -------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = String(v);
      else if (k === 'href') node.setAttribute('href', safeHref(v));
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function safeHref(v) {
    const s = String(v);
    return s.startsWith('/') && !s.startsWith('//') ? s : '#';
  }
  // A URL as the console shows it: no user info (except a DICOM AE title), query or fragment.
  function maskUrl(v) {
    const s = String(v);
    const m = /^([a-z][a-z0-9+.-]*):\/\/([^/?#]*)([^?#]*)([?#].*)?$/i.exec(s);
    if (!m) return s;
    let host = m[2];
    const at = host.lastIndexOf('@');
    if (at >= 0) {
      const user = host.slice(0, at);
      const aet = m[1].split('+')[0].toLowerCase() === 'dicom' && !user.includes(':');
      host = (aet ? user : '***') + '@' + host.slice(at + 1);
    }
    return m[1] + '://' + host + m[3] + (m[4] ? ' (query hidden)' : '');
  }
  function badge(text, cls) { return el('span', {class: 'badge ' + (cls || ''), text}); }
  function fill(tbody, rows, cols, emptyText) {
    tbody.replaceChildren();
    if (!rows.length) {
      tbody.append(el('tr', {}, el('td', {colspan: cols, class: 'empty', text: emptyText})));
      return;
    }
    for (const r of rows) tbody.append(r);
  }
  function listText(v) {
    if (v === null || v === undefined) return '';
    if (Array.isArray(v)) return v.map((x) => (typeof x === 'object' && x ? (x.name || JSON.stringify(x)) : x)).join(', ');
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }
  function now() { return new Date().toLocaleTimeString(); }
  function isoShort(v) { return v ? String(v).replace('T', ' ').replace(/\.\d+/, '').replace(/(Z|[+-]00:?00)$/, '') : ''; }

  // --- the API -------------------------------------------------------------------------------
  async function api(method, url, body) {
    const headers = {'X-CSRF-Token': csrf, Accept: 'application/json'};
    let payload;
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers['Content-Type'] = 'application/json';
    }
    let resp;
    try {
      resp = await fetch(url, {method, headers, body: payload, credentials: 'same-origin'});
    } catch (e) {
      return {ok: false, status: 0, data: null, message: 'The agent did not answer (' + e.message + ').'};
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
    return {ok: resp.ok, status: resp.status, data, message: resp.ok ? '' : describe(resp.status, data)};
  }

  function fieldErrors(data) {
    const detail = data && typeof data === 'object' ? data.detail : null;
    if (!Array.isArray(detail)) return [];
    return detail.map((d) => {
      if (!d || typeof d !== 'object') return {field: '', reason: String(d)};
      let field = d.field;
      if (field === undefined && Array.isArray(d.loc)) field = d.loc.filter((x) => x !== 'body').join('.');
      return {field: String(field || ''), reason: String(d.reason || d.msg || JSON.stringify(d))};
    });
  }

  function detailText(data) {
    if (data && typeof data === 'object' && 'detail' in data) {
      const d = data.detail;
      if (typeof d === 'string') return d;
      const errs = fieldErrors(data);
      if (errs.length) return errs.map((e) => (e.field ? e.field + ': ' : '') + e.reason).join('; ');
      return JSON.stringify(d);
    }
    return typeof data === 'string' ? data.slice(0, 300) : '';
  }

  function describe(status, data) {
    const detail = detailText(data);
    switch (status) {
      case 401: return 'Your session has ended: reload the page and log in again.';
      case 403: return 'Not allowed: ' + (detail || 'your role may not do this') + '.';
      case 404: return 'Not found' + (detail ? ': ' + detail : '') + '.';
      case 409: return 'Changed by someone else since this page was loaded: reload to see the current version.' + (detail ? ' (' + detail + ')' : '');
      case 422: return 'Not valid: ' + (detail || 'check the fields') + '.';
      case 429: return 'Too many requests: wait a moment and try again.';
      default: return 'Failed (HTTP ' + status + ')' + (detail ? ': ' + detail : '') + '.';
    }
  }

  function say(node, text, ok) {
    if (!node) return;
    node.textContent = text;
    node.className = 'msg ' + (ok ? 'ok' : 'bad');
  }
  function msgNear(node) {
    const box = node.closest('form, .card, section, td');
    return (box && $('.msg', box)) || (box && box.closest('.card') && $('.msg', box.closest('.card'))) || $('main .msg');
  }
  function showFieldErrors(form, errs, fallbackNode) {
    $$('[data-error-for]', form).forEach((n) => { n.textContent = ''; });
    $$('.invalid', form).forEach((n) => n.classList.remove('invalid'));
    const loose = [];
    for (const e of errs) {
      const root = e.field.split(/[.[\]]/)[0];
      const slot = root && $('[data-error-for="' + CSS.escape(root) + '"]', form);
      if (slot) {
        slot.textContent = (slot.textContent ? slot.textContent + ' ' : '') + (e.field !== root ? e.field + ': ' : '') + e.reason;
        const input = form.elements[root];
        if (input && input.classList) input.classList.add('invalid');
      } else {
        loose.push((e.field ? e.field + ': ' : '') + e.reason);
      }
    }
    if (fallbackNode && loose.length) say(fallbackNode, loose.join('; '), false);
  }

  // --- generic action buttons and forms ------------------------------------------------------
  document.addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button[data-api]');
    if (!btn || btn.disabled) return;
    ev.preventDefault();
    if (btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) return;
    const msg = msgNear(btn);
    let body;
    if (btn.dataset.body) body = JSON.parse(btn.dataset.body);
    btn.disabled = true;
    const r = await api(btn.dataset.api, btn.dataset.url, body);
    btn.disabled = false;
    if (!r.ok) { say(msg, r.message, false); return; }
    if (btn.dataset.then === 'reload') { window.location.reload(); return; }
    if (btn.dataset.then === 'queue') { refreshQueue(); }
    say(msg, 'Done.', true);
  });

  document.addEventListener('submit', async (ev) => {
    const form = ev.target.closest('form[data-api-form]');
    if (!form) return;
    ev.preventDefault();
    const body = {};
    for (const [k, v] of new FormData(form)) body[k] = v;
    const r = await api(form.dataset.apiForm, form.dataset.url, body);
    const msg = msgNear(form);
    if (!r.ok) { say(msg, r.message, false); return; }
    if (form.dataset.then === 'reload') { window.location.reload(); return; }
    say(msg, 'Done.', true);
  });

  $$('form[data-autosubmit] select').forEach((s) => s.addEventListener('change', () => s.form.submit()));

  // --- live parts: re-fetch this page and swap the marked element ------------------------------
  // The fresh copy is the server's own autoescaped HTML, parsed inertly (DOMParser runs no
  // script) and moved in as nodes.
  for (const note of $$('[data-refresh-target]')) {
    const id = note.dataset.refreshTarget;
    const every = 1000 * Number(note.dataset.refreshS || 5);
    const base = note.textContent;
    let busy = false;
    setInterval(async () => {
      if (document.hidden || busy) return;
      const current = document.getElementById(id);
      if (!current) return;
      // Not while the user has a control inside the live part focused.
      if (current.contains(document.activeElement) && document.activeElement !== document.body) return;
      busy = true;
      try {
        const resp = await fetch(window.location.href, {credentials: 'same-origin', headers: {Accept: 'text/html'}});
        if (resp.redirected && new URL(resp.url).pathname === '/login') { window.location.reload(); return; }
        if (!resp.ok) { note.textContent = base + ' · refresh failed (HTTP ' + resp.status + ')'; return; }
        const doc = new DOMParser().parseFromString(await resp.text(), 'text/html');
        const fresh = doc.getElementById(id);
        if (fresh) current.replaceWith(document.adoptNode(fresh));
        note.textContent = base + ' · updated ' + now();
      } catch (e) {
        note.textContent = base + ' · agent unreachable';
      } finally {
        busy = false;
      }
    }, every);
  }

  // --- rules list: order and fallback -------------------------------------------------------
  document.addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button[data-move]');
    if (!btn) return;
    const row = btn.closest('tr[data-rule]');
    const rows = $$('#rules-table tr[data-rule]');
    const names = rows.map((r) => r.dataset.rule);
    const i = rows.indexOf(row);
    const j = btn.dataset.move === 'up' ? i - 1 : i + 1;
    if (j < 0 || j >= names.length) return;
    [names[i], names[j]] = [names[j], names[i]];
    const r = await api('POST', '/api/rules/reorder', {names});
    if (!r.ok) { say($('main .msg'), r.message, false); return; }
    window.location.reload();
  });

  const fallbackBody = $('#fallback');
  if (fallbackBody) loadFallback();
  async function loadFallback() {
    const r = await api('GET', '/api/rules/fallback');
    if (!r.ok || !r.data || typeof r.data !== 'object') {
      $('#fallback-version').textContent = r.ok ? '' : '(' + r.message + ')';
      return;
    }
    const f = r.data;
    const cell = $('#fallback-action');
    cell.replaceChildren();
    if (f.action === 'discard') cell.append(badge('discard', 'st-skipped'), ' ', el('span', {class: 'small', text: f.reason || ''}));
    else cell.append('process with ', el('strong', {text: f.pipeline || fallbackBody.dataset.defaultPipeline}));
    $('#fallback-priority').replaceChildren(f.priority ? badge(f.priority, 'pr-' + f.priority) : '');
    $('#fallback-destinations').textContent = (f.destinations || []).map(maskUrl).join(', ');
    $('#fallback-notify').textContent = listText(f.notify);
    $('#fallback-version').textContent = f.version ? 'v' + f.version : '';
    const form = $('#fallback-form');
    if (!form) return;
    $('#fallback-edit').onclick = () => {
      form.hidden = false;
      form.elements.action.value = f.action || 'process';
      form.elements.pipeline.value = f.pipeline || '';
      form.elements.reason.value = f.reason || '';
      form.elements.priority.value = f.priority || '';
      form.elements.destinations.value = listText(f.destinations);
    };
    $('#fallback-cancel').onclick = () => { form.hidden = true; };
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      const e = form.elements;
      const keep = ['action', 'reason', 'pipeline', 'priority', 'destinations', 'completion', 'notify'];
      const body = Object.assign(Object.fromEntries(keep.filter((k) => k in f).map((k) => [k, f[k]])), {
        action: e.action.value,
        pipeline: e.pipeline.value.trim() || null,
        reason: e.reason.value.trim() || null,
        priority: e.priority.value || null,
        destinations: splitList(e.destinations.value),
        version: f.version,
      });
      const res = await api('PUT', '/api/rules/fallback', body);
      if (!res.ok) { say($('.msg', form), res.message, false); return; }
      window.location.reload();
    };
  }

  function splitList(s) { return String(s || '').split(',').map((x) => x.trim()).filter(Boolean); }

  // --- rule editor, validation as you type, tester, history ----------------------------------
  const ruleForm = $('#rule-form');
  if (ruleForm) setupEditor(ruleForm);

  function readDraft(form) {
    const e = form.elements;
    const checked = (name) => $$('input[name="' + name + '"]:checked', form).map((x) => x.value);
    const completion = {};
    if (e.quiet_period_s.value !== '') completion.quiet_period_s = Number(e.quiet_period_s.value);
    if (e.expected_instances.value !== '') completion.expected_instances = Number(e.expected_instances.value);
    const series = splitList(e.required_series.value);
    if (series.length) completion.required_series = series;
    if (e.images_in_acquisition.checked) completion.images_in_acquisition = true;
    if (e.on_association_release.checked) completion.on_association_release = true;
    const process = e.action.value === 'process';
    return {
      name: e.name.value.trim(),
      enabled: e.enabled.checked,
      when: e.when.value.split('\n').map((x) => x.trim()).filter(Boolean),
      action: e.action.value,
      reason: e.reason.value.trim() || null,
      pipeline: process ? (e.pipeline.value || null) : null,
      priority: e.priority.value || null,
      destinations: process ? checked('destinations') : [],
      completion: Object.keys(completion).length ? completion : null,
      notify: process ? checked('notify') : [],
      continue: e.continue.checked,
    };
  }

  function setupEditor(form) {
    const validity = $('#validity');
    const saveMsg = $('#save-msg');
    const original = form.dataset.original;
    const version = form.dataset.version ? Number(form.dataset.version) : null;
    const showAction = () => {
      const a = form.elements.action.value;
      $$('[data-for-action]', form).forEach((n) => { n.hidden = n.dataset.forAction !== a; });
    };
    showAction();
    form.elements.action.addEventListener('change', showAction);

    let seq = 0;
    let timer = null;
    async function validate() {
      const mine = ++seq;
      const draft = readDraft(form);
      if (!draft.name) {
        showFieldErrors(form, [{field: 'name', reason: 'a rule needs a name'}]);
        validity.textContent = '';
        return;
      }
      validity.textContent = 'checking…';
      validity.className = 'validity';
      const url = '/api/rules/validate' + (original ? '?editing=' + encodeURIComponent(original) : '');
      const r = await api('POST', url, draft);
      if (mine !== seq) return; // a newer edit is being checked
      if (r.ok) {
        showFieldErrors(form, []);
        validity.textContent = '✓ valid';
        validity.className = 'validity ok';
      } else if (r.status === 422) {
        const errs = fieldErrors(r.data);
        showFieldErrors(form, errs);
        const loose = errs.filter((x) => !$('[data-error-for="' + CSS.escape(x.field.split(/[.[\]]/)[0]) + '"]', form));
        validity.textContent = '✗ ' + errs.length + (errs.length === 1 ? ' problem' : ' problems') +
          (loose.length ? ': ' + loose.map((x) => (x.field ? x.field + ': ' : '') + x.reason).join('; ') : '');
        validity.className = 'validity bad';
      } else {
        validity.textContent = 'could not check: ' + r.message;
        validity.className = 'validity bad';
      }
    }
    const soon = () => { clearTimeout(timer); timer = setTimeout(validate, 350); };
    const readonly = form.hasAttribute('data-readonly');
    if (readonly) $$('input, select, textarea, button', form).forEach((n) => { n.disabled = true; });
    if (!readonly) {
      form.addEventListener('input', soon);
      form.addEventListener('change', soon);
      if (original) validate();
    }

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      if (form.hasAttribute('data-readonly')) return;
      const draft = readDraft(form);
      const r = original
        ? await api('PUT', '/api/rules/' + encodeURIComponent(original), Object.assign({}, draft, {version}))
        : await api('POST', '/api/rules', draft);
      if (!r.ok) {
        if (r.status === 422) showFieldErrors(form, fieldErrors(r.data));
        say(saveMsg, r.message, false);
        return;
      }
      window.location.assign('/rules/edit?name=' + encodeURIComponent(draft.name) + '&saved=1');
    });
    if (new URLSearchParams(window.location.search).get('saved')) say(saveMsg, 'Saved as version ' + version + '.', true);

    const del = $('#rule-delete');
    if (del) {
      del.addEventListener('click', async () => {
        if (!window.confirm('Delete rule ' + original + '? Studies it would take go to the next rule.')) return;
        const url = '/api/rules/' + encodeURIComponent(original) + '?version=' + version;
        const r = await api('DELETE', url, {version});
        if (!r.ok) { say(saveMsg, r.message, false); return; }
        window.location.assign('/rules');
      });
    }

    if ($('#tester')) setupTester(form, original);
    const history = $('#history');
    if (history) loadHistory(history);
  }

  const RULE_KEYS = ['name', 'enabled', 'when', 'action', 'reason', 'pipeline', 'priority',
    'destinations', 'completion', 'notify', 'continue'];

  function draftSet(form, original) {
    let saved = [];
    try { saved = JSON.parse($('#rules-data').textContent) || []; } catch (e) { saved = []; }
    const draft = readDraft(form);
    const pick = (r) => Object.fromEntries(RULE_KEYS.map((k) => [k, r[k] === undefined ? null : r[k]]));
    const rules = saved.map(pick);
    const at = rules.findIndex((r) => r.name === (original || draft.name));
    if (at >= 0) rules[at] = draft; else rules.push(draft);
    return {draft, rules};
  }

  function setupTester(form, original) {
    const drop = $('#dropzone');
    const input = $('#test-file');
    const study = $('#test-study');
    const label = $('#dropzone-text');
    const msg = $('#test-msg');
    const showFile = () => {
      const f = input.files && input.files[0];
      label.textContent = f ? f.name + ' (' + Math.round(f.size / 1024) + ' KiB): ready to test' : 'Drop a DICOM file here, or click to choose one';
      drop.classList.toggle('has-file', Boolean(f));
      if (f) study.value = '';
    };
    input.addEventListener('change', showFile);
    ['dragenter', 'dragover'].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add('over'); }));
    ['dragleave', 'drop'].forEach((t) => drop.addEventListener(t, () => drop.classList.remove('over')));
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) { input.files = e.dataTransfer.files; showFile(); }
    });
    study.addEventListener('change', () => { if (study.value) { input.value = ''; showFile(); } });

    $('#test-run').addEventListener('click', async () => {
      const {draft, rules} = draftSet(form, original);
      const file = input.files && input.files[0];
      let r;
      if (file) {
        const fd = new FormData();
        fd.append('file', file, file.name);
        fd.append('rules', JSON.stringify(rules));
        say(msg, 'Testing…', true);
        r = await api('POST', '/api/rules/test', fd);
      } else if (study.value) {
        say(msg, 'Testing…', true);
        r = await api('POST', '/api/rules/test', {study: study.value, rules});
      } else {
        say(msg, 'Drop a DICOM file or pick a received study first.', false);
        return;
      }
      if (!r.ok) { say(msg, r.message, false); $('#test-result').hidden = true; return; }
      msg.textContent = '';
      msg.className = 'msg';
      renderTest(r.data || {}, draft.name);
    });
  }

  function renderTest(res, draftName) {
    const box = $('#test-result');
    const kv = $('#test-decision');
    kv.replaceChildren();
    const add = (k, v) => kv.append(el('dt', {text: k}), el('dd', {}, v));
    add('Taken by', res.rule ? el('strong', {text: res.rule}) : el('span', {class: 'muted', text: 'no rule: the fallback rule decides'}));
    add('Action', res.action === 'discard' ? badge('discard', 'st-skipped') : String(res.action || ''));
    if (res.pipeline) add('Pipeline', String(res.pipeline));
    if (res.priority) add('Priority', badge(res.priority, 'pr-' + res.priority));
    if (res.destinations && res.destinations.length) add('Destinations', res.destinations.map(maskUrl).join(', '));
    if (res.reason) add('Reason', String(res.reason));
    if (res.fallback) add('Note', 'no rule took it: this is the fallback rule\'s decision');
    for (const w of res.warnings || []) add('Warning', el('span', {class: 'error-text', text: w}));
    const trace = $('#test-trace');
    trace.replaceChildren();
    for (const t of res.trace || []) {
      const part = el('div', {class: 'trace-rule' + (t.matched ? ' matched' : '')});
      part.append(el('div', {class: 'head'},
        el('strong', {text: t.rule}),
        t.version ? el('span', {class: 'muted', text: 'v' + t.version}) : null,
        t.rule === draftName ? badge('draft') : null,
        t.matched ? badge('matched', 'on') : badge('not matched', 'off'),
        t.error ? el('span', {class: 'error-text small', text: t.error}) : null));
      for (const inst of t.instances || []) {
        if (inst.sop_instance_uid) part.append(el('div', {class: 'trace-inst', text: 'instance ' + inst.sop_instance_uid}));
        const table = el('table');
        for (const c of inst.conditions || []) {
          const res = c.result;
          const cls = res === true ? 'res-true' : (res === false ? 'res-false' : 'res-error');
          const shown = res === true ? 'true' : (res === false ? 'false' : 'not evaluated');
          table.append(el('tr', {},
            el('td', {class: 'expr', text: c.expr}),
            el('td', {class: cls + ' nowrap', text: shown}),
            el('td', {class: 'small muted', text: c.reason || ''})));
        }
        if (!(inst.conditions || []).length) table.append(el('tr', {}, el('td', {class: 'small muted', text: 'no condition: always holds'})));
        part.append(table);
      }
      trace.append(part);
    }
    if (!(res.trace || []).length) trace.append(el('p', {class: 'muted small', text: 'No rule was evaluated.'}));
    box.hidden = false;
  }

  async function loadHistory(box) {
    const r = await api('GET', '/api/rules/' + encodeURIComponent(box.dataset.rule) + '/history');
    box.replaceChildren();
    if (r.status === 404) { box.append(el('p', {class: 'muted small', text: 'No recorded change (the rule was not written through the console or the API).'})); return; }
    if (!r.ok) { box.append(el('p', {class: 'msg bad', text: r.message})); return; }
    const entries = (Array.isArray(r.data) ? r.data : (r.data && (r.data.entries || r.data.history)) || []).slice().reverse();
    if (!entries.length) { box.append(el('p', {class: 'muted small', text: 'No recorded change.'})); return; }
    const older = el('details', {class: 'history-older'}, el('summary', {class: 'small', text: (entries.length - 3) + ' older changes'}));
    for (const [i, h] of entries.entries()) {
      const head = el('div', {class: 'small'},
        h.version !== undefined && h.version !== null ? el('strong', {text: 'v' + h.version}) : null, ' ',
        el('span', {text: [isoShort(h.at || h.when), h.actor || h.by || h.user || '', h.action || ''].filter(Boolean).join(' · ')}));
      const pre = el('pre', {class: 'diff'});
      for (const line of String(h.diff || '').split('\n')) {
        if (!line && pre.childNodes.length === 0) continue;
        const cls = line.startsWith('+') ? 'add' : line.startsWith('-') ? 'del' : line.startsWith('@') ? 'hunk' : '';
        pre.append(el('span', {class: cls, text: line}));
      }
      const entry = el('div', {class: 'history-entry'}, head, h.diff ? pre : el('div', {class: 'muted small', text: 'no change in content'}));
      (i < 3 ? box : older).append(entry);
    }
    if (entries.length > 3) box.append(older);
  }

  // --- destinations --------------------------------------------------------------------------
  document.addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button[data-test-destination]');
    if (!btn) return;
    const out = $('.test-out', btn.closest('td'));
    out.textContent = 'testing…';
    out.className = 'test-out small muted';
    btn.disabled = true;
    const r = await api('POST', '/api/destinations/' + encodeURIComponent(btn.dataset.testDestination) + '/test');
    btn.disabled = false;
    if (!r.ok) { out.textContent = r.message; out.className = 'test-out small error-text'; return; }
    const d = r.data || {};
    const ms = d.elapsed_ms !== undefined ? ' (' + Math.round(d.elapsed_ms) + ' ms)' : '';
    out.textContent = (d.ok ? '✓ reachable' : '✗ failed') + ms + (d.detail ? ': ' + d.detail : '');
    out.className = 'test-out small ' + (d.ok ? 'res-true' : 'error-text');
  });

  const destForm = $('#destination-form');
  if (destForm) {
    let editing = null;
    const reset = () => {
      editing = null;
      destForm.reset();
      destForm.elements.name.readOnly = false;
      destForm.elements.url.required = true;
      $('#destination-form-title').textContent = 'Add a destination';
      $('#destination-submit').textContent = 'Add';
      $('#destination-cancel').hidden = true;
      $('#url-hint').hidden = true;
    };
    document.addEventListener('click', (ev) => {
      const btn = ev.target.closest('button[data-edit-destination]');
      if (!btn) return;
      editing = btn.dataset.editDestination;
      destForm.elements.name.value = editing;
      destForm.elements.name.readOnly = true;
      destForm.elements.url.value = '';
      destForm.elements.url.required = false;
      destForm.elements.purpose.value = btn.dataset.purpose;
      destForm.elements.enabled.checked = btn.dataset.enabled === 'true';
      $('#destination-form-title').textContent = 'Edit destination ' + editing;
      $('#destination-submit').textContent = 'Save';
      $('#destination-cancel').hidden = false;
      $('#url-hint').hidden = false;
      destForm.elements.url.focus();
    });
    $('#destination-cancel').addEventListener('click', reset);
    destForm.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const e = destForm.elements;
      const body = {name: e.name.value.trim(), url: e.url.value.trim(), purpose: e.purpose.value, enabled: e.enabled.checked};
      if (editing && !body.url) delete body.url; // keep the stored URL
      const r = editing
        ? await api('PUT', '/api/destinations/' + encodeURIComponent(editing), body)
        : await api('POST', '/api/destinations', body);
      if (!r.ok) {
        showFieldErrors(destForm, fieldErrors(r.data));
        say($('.msg', destForm), r.message, false);
        return;
      }
      window.location.reload();
    });
  }

  const settingsDest = $('#settings-destinations');
  if (settingsDest) loadSettingsDestinations();
  async function loadSettingsDestinations() {
    const r = await api('GET', '/api/destinations');
    if (!r.ok || !Array.isArray(r.data)) return;
    const rows = r.data.filter((d) => d.source && d.source !== 'database').map((d) => el('tr', {},
      el('td', {}, el('strong', {text: d.name})),
      el('td', {text: d.purpose || ''}),
      el('td', {class: 'uid', text: maskUrl(d.url || '')}),
      el('td', {class: 'test-cell'}, canOperate ? el('button', {class: 'small', 'data-test-destination': d.name, text: 'Test'}) : null, ' ',
        el('span', {class: 'test-out small'}))));
    if (!rows.length) return;
    fill($('tbody', settingsDest), rows, 4, '');
    settingsDest.hidden = false;
  }

  // --- pipelines -----------------------------------------------------------------------------
  const pipesTable = $('#pipelines-table');
  if (pipesTable) loadPipelines();
  async function loadPipelines() {
    const r = await api('GET', '/api/pipelines');
    const tbody = $('tbody', pipesTable);
    if (!r.ok) { fill(tbody, [], 6, r.message); return; }
    const list = Array.isArray(r.data) ? r.data : (r.data && r.data.pipelines) || [];
    fill(tbody, list.map((p) => {
      const bundle = p.bundle && typeof p.bundle === 'object' ? p.bundle : {path: p.bundle};
      const version = p.version || bundle.version || '';
      const checksum = p.checksum || bundle.checksum || '';
      const verified = p.checksum_verified !== undefined ? p.checksum_verified : (p.verified !== undefined ? p.verified : bundle.verified);
      const demo = p.is_demo !== undefined ? p.is_demo : bundle.is_demo;
      const workers = Array.isArray(p.workers) ? p.workers.map((w) => (typeof w === 'object' && w ? w.name : w)) : [];
      const served = p.served !== undefined ? p.served : workers.length > 0;
      return el('tr', {class: served ? '' : 'row-error'},
        el('td', {}, el('strong', {text: p.name}), p.description ? el('div', {class: 'small muted', text: p.description}) : null,
          p.enabled === false ? badge('disabled', 'off') : null),
        el('td', {class: 'uid small', text: bundle.name || bundle.path || ''}),
        el('td', {text: version}),
        el('td', {},
          checksum ? el('span', {class: 'uid small', title: checksum, text: String(checksum).slice(0, 12) + '…'}) : null, ' ',
          verified === true ? badge('verified', 'on') : verified === false ? badge('NOT verified', 'st-failed') : badge('unknown')),
        el('td', {}, demo ? badge('DEMO', 'demo') : (demo === false ? badge('trained', 'on') : '')),
        el('td', {}, served ? workers.join(', ') || badge('served', 'on') : el('span', {class: 'error-text', text: 'no worker serves it: its jobs wait'})));
    }), 6, 'No pipeline configured.');
    const upd = $('#pipelines-updated');
    if (upd) upd.textContent = 'as of ' + now();
  }

  // --- queue ---------------------------------------------------------------------------------
  const queueState = $('#queue-state');
  if (queueState) { refreshQueue(); setInterval(() => { if (!document.hidden) refreshQueue(); }, 5000); }
  function classOf(p) {
    if (CLASSES.includes(p)) return p;
    const n = Number(p);
    if (Number.isNaN(n)) return String(p);
    return n <= 1 ? 'stat' : n <= 4 ? 'urgent' : n <= 7 ? 'routine' : 'offpeak';
  }
  async function refreshQueue() {
    if (!queueState) return;
    const r = await api('GET', '/api/queue');
    const msg = $('.msg', queueState);
    if (!r.ok) { say(msg, r.message, false); return; }
    const q = r.data || {};
    const suspended = Boolean(q.suspended);
    const state = $('#queue-suspended');
    state.textContent = suspended ? 'SUSPENDED: jobs wait until resumed' : 'running';
    state.className = suspended ? 'error-text' : 'res-true';
    const sBtn = $('#queue-suspend');
    const rBtn = $('#queue-resume');
    if (sBtn) sBtn.hidden = suspended;
    if (rBtn) rBtn.hidden = !suspended;
    // Depth: a list of {pipeline, priority_class, pending, queued, running} (or {depth|count}),
    // or {pipeline: {priority: n}}, or {pipeline: n}.
    const depth = {};
    const running = {};
    const addDepth = (pipe, prio, n) => {
      const row = depth[pipe] || (depth[pipe] = {});
      const c = prio === null || prio === undefined ? 'routine' : classOf(prio);
      row[c] = (row[c] || 0) + Number(n || 0);
    };
    const d = q.depth !== undefined ? q.depth : q.queues;
    if (Array.isArray(d)) {
      for (const x of d) {
        const pipe = x.pipeline || x.queue || '?';
        const prio = x.priority_class !== undefined ? x.priority_class : x.priority;
        let n = x.depth !== undefined ? x.depth : x.count;
        if (n === undefined) n = Number(x.pending || 0) + Number(x.queued || 0);
        addDepth(pipe, prio, n);
        running[pipe] = (running[pipe] || 0) + Number(x.running || 0);
      }
    } else if (d && typeof d === 'object') {
      for (const [pipe, v] of Object.entries(d)) {
        if (v && typeof v === 'object') for (const [p, n] of Object.entries(v)) addDepth(pipe, p, n);
        else addDepth(pipe, null, v);
      }
    }
    const dRows = Object.keys(depth).sort().map((pipe) => {
      const row = depth[pipe];
      const total = Object.values(row).reduce((a, b) => a + b, 0);
      return el('tr', {}, el('td', {}, el('strong', {text: pipe})),
        ...CLASSES.map((c) => el('td', {class: 'num', text: row[c] || 0})),
        el('td', {class: 'num'}, el('strong', {text: total})),
        el('td', {class: 'num', text: running[pipe] || 0}));
    });
    fill($('#queue-depth tbody'), dRows, 7, 'Nothing waiting or running.');
    const workers = Array.isArray(q.workers) ? q.workers : [];
    fill($('#queue-workers tbody'), workers.map((w) => {
      const alive = w.alive !== undefined ? w.alive : true;
      return el('tr', {class: alive ? '' : 'row-off'},
        el('td', {text: w.name || ''}),
        el('td', {text: listText(w.pipelines)}),
        el('td', {text: w.lane || ''}),
        el('td', {class: 'nowrap small', text: isoShort(w.last_seen_at || w.last_seen)}),
        el('td', {}, alive ? badge('alive', 'on') : badge('silent', 'st-failed')));
    }), 5, typeof q.workers === 'number' ? q.workers + ' worker(s) alive' : 'No worker has announced itself: nothing is processed.');
    const unserved = (q.unserved || q.unserved_pipelines || []).map((u) => (
      u && typeof u === 'object' ? u.pipeline + (u.waiting !== undefined ? ' (' + u.waiting + ' waiting)' : '') : String(u)));
    const warn = $('#queue-unserved');
    warn.hidden = !unserved.length;
    warn.textContent = unserved.length ? 'No live worker serves ' + unserved.join(', ') + ': these jobs wait until one does.' : '';
    const upd = $('#queue-updated');
    if (upd) upd.textContent = 'updated ' + now();
  }

  // --- users ---------------------------------------------------------------------------------
  const userForm = $('#user-form');
  if (userForm) {
    userForm.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const e = userForm.elements;
      const r = await api('POST', '/api/users', {name: e.name.value.trim(), role: e.role.value, password: e.password.value});
      if (!r.ok) {
        showFieldErrors(userForm, fieldErrors(r.data));
        say($('.msg', userForm), r.message, false);
        return;
      }
      window.location.reload();
    });
    $$('select.role-select').forEach((sel) => {
      const before = sel.value;
      sel.addEventListener('change', async () => {
        const r = await api('PATCH', '/api/users/' + encodeURIComponent(sel.dataset.user), {role: sel.value});
        const msg = $('main > .msg');
        if (!r.ok) { sel.value = before; say(msg, r.message, false); return; }
        say(msg, sel.dataset.user + ' is now ' + sel.value + '.', true);
      });
    });
    document.addEventListener('click', async (ev) => {
      const btn = ev.target.closest('button[data-token-user]');
      if (!btn) return;
      const name = btn.dataset.tokenUser;
      if (!window.confirm('Issue a new API token for ' + name + '?')) return;
      const r = await api('POST', '/api/users/' + encodeURIComponent(name) + '/tokens');
      if (!r.ok) { say($('main > .msg'), r.message, false); return; }
      const token = typeof r.data === 'string' ? r.data : (r.data && (r.data.token || r.data.value)) || '';
      $('#token-user').textContent = name;
      $('#token-value').textContent = token;
      $('#token-box').hidden = false;
    });
    const pwForm = $('#password-form');
    pwForm.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const e = pwForm.elements;
      const r = await api('PATCH', '/api/users/' + encodeURIComponent(e.user.value), {password: e.password.value});
      if (!r.ok) { showFieldErrors(pwForm, fieldErrors(r.data)); say($('.msg', pwForm), r.message, false); return; }
      e.password.value = '';
      say($('.msg', pwForm), 'Password of ' + e.user.value + ' set.', true);
    });
    $('#token-copy').addEventListener('click', async () => {
      try { await navigator.clipboard.writeText($('#token-value').textContent); $('#token-copy').textContent = 'Copied'; } catch (e) {
        window.getSelection().selectAllChildren($('#token-value'));
      }
    });
    $('#token-hide').addEventListener('click', () => { $('#token-value').textContent = ''; $('#token-box').hidden = true; });
  }
})();
