'use strict';
(() => {
const D = JSON.parse(document.getElementById('attnzoo-data').textContent);
const $ = (id) => document.getElementById(id);
const N = D.tokens.length;
const VIRIDIS = ['#440154', '#48186a', '#472d7b', '#424086', '#3b528b', '#33638d', '#2c728e', '#26828e', '#21918c',
  '#1fa088', '#28ae80', '#3fbc73', '#5ec962', '#84d44b', '#addc30', '#d8e219', '#fde725'];
const HEAD_COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
  '#17becf', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#c49c94', '#f7b6d2', '#c7c7c7', '#dbdb8d', '#9edae5'];
const headColour = (h) => HEAD_COLOURS[h % HEAD_COLOURS.length];
const short = (t, n = 24) => (t.length > n ? t.slice(0, n - 1) + '\u2026' : t);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const fmt = (v) => (v === 0 ? '0' : v >= 0.01 ? v.toFixed(v >= 0.1 ? 2 : 3) : v.toExponential(1));

// colour table (viridis, 256 steps) and the sqrt-spaced quantisation: weight = vmax * (q / Q)^2
const LUT = new Uint8Array(256 * 3);
(() => {
  const rgb = VIRIDIS.map(s => [1, 3, 5].map(i => parseInt(s.slice(i, i + 2), 16)));
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (rgb.length - 1), a = Math.min(Math.floor(x), rgb.length - 2), t = x - a;
    for (let c = 0; c < 3; c++) LUT[3 * i + c] = Math.round(rgb[a][c] * (1 - t) + rgb[a + 1][c] * t);
  }
})();
const Q = 2 ** D.bits - 1;
const NL = new Float32Array(Q + 1);
for (let i = 0; i <= Q; i++) NL[i] = (i / Q) * (i / Q);

function ready(m, n, k) {
  if (m.q) return m;
  const s = atob(m.b64), b = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i);
  m.q = D.bits === 16 ? new Uint16Array(b.buffer) : b;
  m.n = n; m.k = k; delete m.b64;
  return m;
}
const headMap = (l, h) => ready(D.maps[l][h], N, D.keys[l]);
const rolloutMap = () => ready(D.rollout, N, N);
const cellQ = (m, i, j) => m.q[Math.floor(i / m.f) * m.c + Math.floor(j / m.f)];
const weight = (m, i, j) => m.vmax * NL[cellQ(m, i, j)];
const keyLabel = (j, k) => (k === N ? D.tokens[j] : `#${j}`);

// Paint the cells [y0, y0 + ph / s) x [x0, x0 + pw / s) of m at s pixels a cell; a pixel over several
// cells shows their maximum, so thin patterns survive zooming out.
function paint(ctx, m, x0, y0, s, pw, ph, dx, dy, sqrt) {
  pw = Math.max(1, Math.round(pw)); ph = Math.max(1, Math.round(ph));
  const img = ctx.createImageData(pw, ph), px = img.data;
  const span = (n, t0, f, count, cells) => {
    const out = new Int32Array(2 * n);
    for (let p = 0; p < n; p++) {
      const a = t0 + p / s, b = t0 + (p + 1) / s;
      if (b <= 0 || a >= count) { out[2 * p] = -1; continue; }
      const lo = Math.min(cells - 1, Math.floor(Math.max(a, 0) / f));
      out[2 * p] = lo; out[2 * p + 1] = Math.max(lo + 1, Math.min(cells, Math.ceil(Math.min(b, count) / f)));
    }
    return out;
  };
  const cols = span(pw, x0, m.f, m.k, m.c), rows = span(ph, y0, m.f, m.n, m.r), q = m.q, c = m.c;
  for (let y = 0; y < ph; y++) {
    const r0 = rows[2 * y], r1 = rows[2 * y + 1];
    for (let x = 0; x < pw; x++) {
      const o = 4 * (y * pw + x), c0 = cols[2 * x];
      px[o + 3] = 255;
      if (r0 < 0 || c0 < 0) { px[o] = px[o + 1] = px[o + 2] = 255; continue; }
      const c1 = cols[2 * x + 1];
      let best = 0;
      for (let r = r0; r < r1; r++) for (let cc = c0; cc < c1; cc++) { const v = q[r * c + cc]; if (v > best) best = v; }
      const i = 3 * Math.round(255 * (sqrt ? best / Q : NL[best]));
      px[o] = LUT[i]; px[o + 1] = LUT[i + 1]; px[o + 2] = LUT[i + 2];
    }
  }
  ctx.putImageData(img, dx, dy);
}

// ---- a zoomable canvas heatmap with a colour bar and the value under the mouse ----
class Heat {
  constructor(root, onQuery) {
    this.root = root; this.onQuery = onQuery; root.textContent = '';
    this.m = null; this.x0 = 0; this.y0 = 0; this.s = 1; this.query = null; this.LM = 120; this.TM = 100;
    const bar = el('div', 'bar');
    const button = (text, title, fn) => { const b = el('button', '', text); b.type = 'button'; b.title = title; b.onclick = fn; bar.append(b); return b; };
    this.zin = button('+', 'zoom in', () => this.zoomAt(this.pw / 2, this.ph / 2, 2));
    this.zout = button('\u2212', 'zoom out', () => this.zoomAt(this.pw / 2, this.ph / 2, 0.5));
    this.zfit = button('fit', 'show the whole map', () => { this.fit(); this.draw(); });
    this.scale = el('select');
    for (const [v, t] of [['sqrt', 'sqrt colour scale'], ['linear', 'linear colour scale']]) this.scale.add(new Option(t, v));
    this.scale.onchange = () => this.draw();
    this.bar = el('canvas', 'cbar'); this.info = el('span', 'note');
    bar.append(this.scale, this.bar, this.info);
    this.canvas = el('canvas', 'plot'); this.tip = el('div', 'tip');
    root.append(bar, this.canvas, this.tip);
    const c = this.canvas;
    c.addEventListener('wheel', (e) => {
      e.preventDefault(); const [x, y] = this.local(e); this.zoomAt(x, y, e.deltaY < 0 ? 1.25 : 0.8);
    }, {passive: false});
    c.addEventListener('mousedown', (e) => { this.drag = {x: e.clientX, y: e.clientY, x0: this.x0, y0: this.y0, moved: false}; });
    window.addEventListener('mousemove', (e) => {
      if (!this.drag) return;
      const dx = e.clientX - this.drag.x, dy = e.clientY - this.drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) { this.drag.moved = true; c.classList.add('drag'); }
      if (this.drag.moved) { this.x0 = this.drag.x0 - dx / this.s; this.y0 = this.drag.y0 - dy / this.s; this.clamp(); this.draw(); }
    });
    window.addEventListener('mouseup', (e) => {
      const d = this.drag; this.drag = null; c.classList.remove('drag');
      if (d && !d.moved && e.target === c) { const cell = this.cell(...this.local(e)); if (cell) this.onQuery(cell[0]); }
    });
    c.addEventListener('mousemove', (e) => this.hover(e));
    c.addEventListener('mouseleave', () => { this.tip.style.display = 'none'; });
  }
  local(e) { const r = this.canvas.getBoundingClientRect(); return [e.clientX - r.left - this.LM, e.clientY - r.top - this.TM]; }
  cell(x, y) {
    if (!this.m || x < 0 || y < 0 || x >= this.pw || y >= this.ph) return null;
    const i = Math.floor(this.y0 + y / this.s), j = Math.floor(this.x0 + x / this.s);
    return i < this.m.n && j < this.m.k ? [i, j] : null;
  }
  layout() {
    const w = Math.max(320, this.root.clientWidth);
    this.pw = w - this.LM - 6;
    this.ph = Math.max(240, Math.min(this.pw, window.innerHeight - 190));
    this.W = w; this.H = this.TM + this.ph + 4;
  }
  fitScale() { return Math.min(this.pw / this.m.k, this.ph / this.m.n); }
  fit() { this.layout(); this.s = this.fitScale(); this.x0 = 0; this.y0 = 0; }
  clamp() {
    this.s = Math.min(Math.max(48, 8 * this.fitScale()), Math.max(this.fitScale(), this.s));
    this.x0 = Math.min(Math.max(this.x0, 0), Math.max(0, this.m.k - this.pw / this.s));
    this.y0 = Math.min(Math.max(this.y0, 0), Math.max(0, this.m.n - this.ph / this.s));
  }
  zoomAt(x, y, factor) {
    const tx = this.x0 + x / this.s, ty = this.y0 + y / this.s;
    this.s *= factor; this.clamp();
    this.x0 = tx - x / this.s; this.y0 = ty - y / this.s; this.clamp(); this.draw();
  }
  centre(i, j, s) {
    this.layout(); this.s = s; this.clamp();
    this.x0 = j + 0.5 - this.pw / (2 * this.s); this.y0 = i + 0.5 - this.ph / (2 * this.s); this.clamp(); this.draw();
  }
  set(m) {
    const same = this.m && this.m.n === m.n && this.m.k === m.k;
    this.m = m;
    if (same) { this.layout(); this.clamp(); } else this.fit();
    this.draw();
  }
  setQuery(i) { this.query = i; this.draw(); }
  draw() {
    if (!this.m) return;
    this.layout(); this.clamp();
    const m = this.m, c = this.canvas, dpr = window.devicePixelRatio || 1, s = this.s, sqrt = this.scale.value === 'sqrt';
    c.style.height = `${this.H}px`; c.width = Math.round(this.W * dpr); c.height = Math.round(this.H * dpr);
    const ctx = c.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, c.width, c.height);
    paint(ctx, m, this.x0, this.y0, s * dpr, this.pw * dpr, this.ph * dpr, Math.round(this.LM * dpr), Math.round(this.TM * dpr), sqrt);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const LM = this.LM, TM = this.TM, pw = this.pw, ph = this.ph;
    const i0 = Math.floor(this.y0), i1 = Math.min(m.n, Math.ceil(this.y0 + ph / s));
    const j0 = Math.floor(this.x0), j1 = Math.min(m.k, Math.ceil(this.x0 + pw / s));
    const yOf = (i) => TM + (i - this.y0 + 0.5) * s, xOf = (j) => LM + (j - this.x0 + 0.5) * s;
    ctx.fillStyle = '#333'; ctx.textBaseline = 'middle';
    const labels = s >= 9, step = labels ? 1 : [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000].find(t => t * s >= 28) || 10000;
    ctx.font = `${labels ? Math.min(12, Math.floor(s * 0.8)) : 10}px sans-serif`;
    ctx.save(); ctx.beginPath(); ctx.rect(0, TM, LM, ph); ctx.clip(); ctx.textAlign = 'right';
    for (let i = Math.ceil(i0 / step) * step; i < i1; i += step) ctx.fillText(labels ? short(D.tokens[i], 16) : String(i), LM - 4, yOf(i));
    ctx.restore();
    ctx.save(); ctx.beginPath(); ctx.rect(LM, 0, pw, TM); ctx.clip(); ctx.textAlign = 'left';
    for (let j = Math.ceil(j0 / step) * step; j < j1; j += step) {
      ctx.save(); ctx.translate(xOf(j), TM - 4); ctx.rotate(-Math.PI / 2);
      ctx.fillText(labels ? short(keyLabel(j, m.k), 14) : String(j), 0, 0); ctx.restore();
    }
    ctx.restore();
    ctx.font = 'bold 11px sans-serif'; ctx.fillStyle = '#555';
    ctx.textAlign = 'right'; ctx.fillText('key \u2192', LM - 6, 12);
    ctx.textAlign = 'left'; ctx.fillText('query \u2193', 4, TM - 10);
    ctx.strokeStyle = '#999'; ctx.lineWidth = 1;
    ctx.strokeRect(LM - 0.5, TM - 0.5, Math.min(pw, (m.k - this.x0) * s) + 1, Math.min(ph, (m.n - this.y0) * s) + 1);
    if (this.query !== null && this.query >= i0 && this.query < i1) {
      ctx.strokeStyle = '#d62728'; ctx.lineWidth = 2;
      ctx.strokeRect(LM, TM + (this.query - this.y0) * s, Math.min(pw, (m.k - this.x0) * s), Math.max(2, s));
    }
    this.colourBar(sqrt);
    this.info.textContent = `${Math.round(100 * s / this.fitScale())}% \u00b7 rows ${i0}\u2013${i1 - 1}, keys ${j0}\u2013${j1 - 1}` +
      (m.f > 1 ? ` \u00b7 blocks of ${m.f}\u00d7${m.f} tokens` : '');
    Object.assign(this.root.dataset, {scale: s.toFixed(3), x0: this.x0.toFixed(2), y0: this.y0.toFixed(2)});
  }
  colourBar(sqrt) {
    const b = this.bar, dpr = window.devicePixelRatio || 1, w = 190, h = 30;
    b.style.width = `${w}px`; b.style.height = `${h}px`; b.width = w * dpr; b.height = h * dpr;
    const ctx = b.getContext('2d'); ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    for (let x = 0; x < 170; x++) { const i = 3 * Math.round((255 * x) / 169); ctx.fillStyle = `rgb(${LUT[i]},${LUT[i + 1]},${LUT[i + 2]})`; ctx.fillRect(10 + x, 2, 1, 11); }
    ctx.fillStyle = '#333'; ctx.font = '10px sans-serif'; ctx.textAlign = 'center'; ctx.textBaseline = 'top';
    for (const t of [0, 0.25, 0.5, 0.75, 1]) {
      const v = this.m.vmax * (sqrt ? t * t : t);
      ctx.fillRect(10 + t * 169, 13, 1, 3); ctx.fillText(fmt(v), 10 + t * 169, 17);
    }
    b.title = `colour scale (${sqrt ? 'sqrt' : 'linear'}): 0 to ${fmt(this.m.vmax)}, the map's maximum`;
  }
  hover(e) {
    const [x, y] = this.local(e), cell = this.cell(x, y), tip = this.tip;
    if (!cell || this.drag?.moved) { tip.style.display = 'none'; return; }
    const [i, j] = cell, m = this.m, f = m.f, v = weight(m, i, j);
    if (f === 1) {
      tip.textContent = `query ${i} \u201c${short(D.tokens[i], 30)}\u201d\nkey ${j} \u201c${short(keyLabel(j, m.k), 30)}\u201d\nweight ${v.toFixed(4)}`;
    } else {
      const a = Math.floor(i / f) * f, b = Math.floor(j / f) * f;
      tip.textContent = `queries ${a}\u2013${Math.min(m.n, a + f) - 1}, keys ${b}\u2013${Math.min(m.k, b + f) - 1}\n` +
        `max weight ${v.toFixed(4)} (a ${f}\u00d7${f} block)`;
    }
    tip.dataset.cell = `${i},${j}`;
    const r = this.root.getBoundingClientRect();
    tip.style.display = 'block';
    tip.style.left = `${Math.min(e.clientX - r.left + 14, r.width - tip.offsetWidth - 4)}px`;
    tip.style.top = `${e.clientY - r.top + 14}px`;
  }
}

// ---- state ----
const cur = {l: D.init.layer, h: D.init.head, q: D.query};
const active = [];
let pin = null, hover = null, matches = [], matchAt = -1;
const ABOUT_HEAD_VIEW = $('head-view-about').textContent;
const heat = new Heat($('map'), (i) => selectQuery(i));
const rollHeat = D.rollout ? new Heat($('rollout'), (i) => selectQuery(i)) : null;

function buildModelView() {
  const box = $('model-view'); box.textContent = '';
  const H = Math.max(...D.maps.map(a => a.length));
  const T = Math.max(36, Math.min(110, Math.floor((box.clientWidth - 70) / H) - 8));
  box.style.gridTemplateColumns = `auto repeat(${H}, ${T + 4}px)`;
  box.append(el('div'));
  for (let h = 0; h < H; h++) box.append(el('div', 'colh', `head ${h}`));
  D.maps.forEach((heads, l) => {
    box.append(el('div', 'lab', `layer ${D.layers[l]}`));
    for (let h = 0; h < H; h++) {
      if (h >= heads.length) { box.append(el('div')); continue; }
      const m = headMap(l, h), c = el('canvas'), s = T / Math.max(m.n, m.k);
      c.width = Math.max(1, Math.round(m.k * s)); c.height = Math.max(1, Math.round(m.n * s));
      c.style.width = `${c.width}px`; c.style.height = `${c.height}px`;
      paint(c.getContext('2d'), m, 0, 0, s, c.width, c.height, 0, 0, true);
      c.title = `layer ${D.layers[l]} head ${h}`; c.dataset.l = l; c.dataset.h = h;
      c.onclick = () => openHead(l, h, true);
      box.append(c);
    }
  });
  markCurrent();
}

function buildHeadView() {
  const l = cur.l, heads = D.maps[l], k = D.keys[l], toggles = $('head-toggles'), view = $('head-view');
  const home = $('tokens-home'), strip = $('tokens');
  home.append(strip);
  toggles.textContent = ''; view.textContent = ''; pin = null; hover = null;
  const full = heads.every(m => m.f === 1), ok = full && Math.max(N, k) <= D.headViewTokens;
  $('head-view-note').textContent = ok ? '' : Math.max(N, k) > D.headViewTokens
    ? `The head view draws one line per token pair, up to ${D.headViewTokens} tokens; this input has ${Math.max(N, k)}.`
    : `Layer ${D.layers[l]} is embedded downsampled (see the note at the top); the head view needs its full maps: render again with this layer.`;
  $('head-view-title').textContent = ok ? 'Head view' : 'Text';
  $('head-view-about').textContent = ok ? ABOUT_HEAD_VIEW
    : 'The tokens, shaded by the selected query\'s attention in the open head; click a token to select it as the query, or find one with the search box.';
  home.style.display = ok ? '' : 'none';
  if (!ok) { view.append(strip); return; }
  heads.forEach((_, h) => {
    const lab = el('label'), box = el('input'), sw = el('span', 'sw');
    box.type = 'checkbox'; box.checked = active[h] !== false; box.dataset.h = h;
    box.onchange = () => { active[h] = box.checked; drawLines(); };
    sw.style.background = headColour(h);
    lab.title = 'click: on/off; double-click: this head only';
    lab.addEventListener('dblclick', (e) => {
      e.preventDefault();
      heads.forEach((_, g) => { active[g] = g === h; });
      toggles.querySelectorAll('input').forEach(x => { x.checked = +x.dataset.h === h; });
      drawLines();
    });
    lab.append(box, sw, el('span', '', `${h}`)); toggles.append(lab);
  });
  for (const [text, on] of [['all', true], ['none', false]]) {
    const b = el('button', '', text); b.type = 'button'; b.id = `heads-${text}`;
    b.onclick = () => { heads.forEach((_, h) => { active[h] = on; }); toggles.querySelectorAll('input').forEach(x => { x.checked = on; }); drawLines(); };
    toggles.append(b);
  }
  const col = (side, n, label) => {
    const c = el('div', 'col');
    for (let i = 0; i < n; i++) {
      const t = el('div', `tok ${side}`, short(label(i))); t.title = `${i}: ${label(i)}`; t.dataset.i = i;
      t.addEventListener('mouseenter', () => { if (!pin) { hover = [side, i]; drawLines(); } });
      t.addEventListener('mouseleave', () => { if (!pin) { hover = null; drawLines(); } });
      t.addEventListener('click', () => {
        pin = pin && pin[0] === side && pin[1] === i ? null : [side, i]; hover = null; drawLines();
        if (pin && side === 'q') selectQuery(i);
      });
      c.append(t);
    }
    return c;
  };
  const left = col('q', N, (i) => D.tokens[i]), canvas = el('canvas'), right = col('k', k, (j) => keyLabel(j, k));
  canvas.id = 'lines';
  view.append(left, canvas, right);
  canvas.dataset.w = Math.max(120, Math.min(420, view.clientWidth - left.offsetWidth - right.offsetWidth - 8));
  drawLines();
}

function drawLines() {
  const c = $('lines');
  if (!c) return;
  const l = cur.l, k = D.keys[l], focus = pin || hover, dpr = window.devicePixelRatio || 1, w = +c.dataset.w, rh = 20;
  const height = Math.max(N, k) * rh;
  c.style.width = `${w}px`; c.style.height = `${height}px`; c.width = w * dpr; c.height = height * dpr;
  const ctx = c.getContext('2d'); ctx.setTransform(dpr, 0, 0, dpr, 0, 0); ctx.lineWidth = focus ? 2 : 1.2;
  let count = 0;
  const shown = [];
  D.maps[l].forEach((_, h) => {
    if (active[h] === false) return;
    shown.push(h);
    const m = headMap(l, h); ctx.strokeStyle = headColour(h);
    for (let i = 0; i < N; i++) {
      if (focus && focus[0] === 'q' && focus[1] !== i) continue;
      for (let j = 0; j < k; j++) {
        if (focus && focus[0] === 'k' && focus[1] !== j) continue;
        const v = m.vmax * NL[m.q[i * m.c + j]];
        if (v < D.minLine) continue;
        ctx.globalAlpha = Math.min(1, v); ctx.beginPath();
        ctx.moveTo(0, i * rh + rh / 2); ctx.lineTo(w, j * rh + rh / 2); ctx.stroke(); count++;
      }
    }
  });
  c.dataset.lines = count; c.dataset.heads = shown.join(',');
  document.querySelectorAll('#head-view .tok').forEach(t => {
    const side = t.classList.contains('q') ? 'q' : 'k', me = focus && focus[0] === side && focus[1] === +t.dataset.i;
    t.classList.toggle('hl', Boolean(me)); t.classList.toggle('pin', Boolean(me && pin));
  });
}

function drawQueryBars() {
  const box = $('query-bars'), i = cur.q; box.textContent = '';
  const lists = [[`layer ${D.layers[cur.l]}, head ${cur.h}`, headMap(cur.l, cur.h)]];
  if (D.rollout) lists.push(['rollout', rolloutMap()]);
  for (const [name, m] of lists) {
    const div = el('div'), f = m.f, rows = [];
    div.append(el('h3', '', `${name}: query ${i} \u201c${short(D.tokens[i], 30)}\u201d`));
    for (let b = 0; b < m.c; b++) {
      const a = b * f, z = Math.min(m.k, a + f) - 1;
      rows.push({label: f === 1 ? keyLabel(a, m.k) : `keys ${a}\u2013${z}`, v: weight(m, i, a), self: i >= a && i <= z});
    }
    let shown = rows;
    if (rows.length > 40) {
      shown = [...rows].sort((x, y) => y.v - x.v).slice(0, 20);
      div.append(el('p', 'note', `the 20 largest of ${rows.length}` + (f > 1 ? ` blocks of ${f} keys (block maximum)` : ' keys')));
    }
    const top = Math.max(...shown.map(r => r.v), 1e-12);
    for (const r of shown) {
      const d = el('div', r.self ? 'qb self' : 'qb'), b = el('span', 'b');
      b.style.width = `${(180 * r.v) / top}px`;
      d.append(el('span', 't', r.label), b, el('span', 'v', r.v.toFixed(3)));
      d.firstChild.title = r.label; div.append(d);
    }
    box.append(div);
  }
}

function shadeTokens() {
  const m = headMap(cur.l, cur.h), spans = $('tokens').children, keysAreTokens = m.k === N;
  let top = 1e-12;
  if (keysAreTokens) for (let j = 0; j < N; j++) top = Math.max(top, weight(m, cur.q, j));
  for (let j = 0; j < N; j++) {
    const u = keysAreTokens ? Math.sqrt(weight(m, cur.q, j) / top) : 0;
    spans[j].style.background = u > 0.02 ? `rgba(255,127,14,${(0.75 * u).toFixed(3)})` : '';
    spans[j].classList.toggle('sel', j === cur.q);
  }
}

function markCurrent() {
  document.querySelectorAll('#model-view canvas').forEach(c => c.classList.toggle('cur', +c.dataset.l === cur.l && +c.dataset.h === cur.h));
  document.querySelectorAll('#summary tr.row').forEach(r => r.classList.toggle('cur', +r.dataset.l === cur.l && +r.dataset.h === cur.h));
}

function fillHeads() {
  const h = $('head'); h.textContent = '';
  D.maps[cur.l].forEach((_, i) => h.add(new Option(`${i}`, i)));
  h.value = cur.h;
}

function openHead(l, h, scroll) {
  const layerChanged = l !== cur.l || !$('head-toggles').childElementCount;
  cur.l = l; cur.h = Math.min(h, D.maps[l].length - 1);
  $('layer').value = l; fillHeads();
  if (layerChanged) buildHeadView();
  const m = headMap(cur.l, cur.h);
  heat.set(m);
  $('current').textContent = `layer ${D.layers[l]}, head ${cur.h}`;
  $('map-title').textContent = `\u2014 layer ${D.layers[l]}, head ${cur.h}`;
  $('map-note').textContent = m.f > 1 ? `This head is embedded in blocks of ${m.f}\u00d7${m.f} tokens (each the block's maximum); `
    + `render again with layer=${D.layers[l]} head=${cur.h} for every token.` : '';
  markCurrent(); drawQueryBars(); shadeTokens();
  if (scroll) $('map').scrollIntoView({block: 'nearest'});
}

function selectQuery(i) {
  cur.q = i; $('query').value = i;
  for (const h of [heat, rollHeat]) {
    if (!h) continue;
    const rows = h.ph / h.s;  // keep the selected row in view
    if (i < h.y0 || i >= h.y0 + rows) { h.y0 = i + 0.5 - rows / 2; h.clamp(); }
    h.setQuery(i);
  }
  drawQueryBars(); shadeTokens();
}

function runSearch() {
  const s = $('search').value.trim(), low = s.toLowerCase();
  matches = !s ? [] : /^#\d+$/.test(s) ? [+s.slice(1)].filter(i => i < N)
    : D.tokens.map((t, i) => (t.toLowerCase().includes(low) ? i : -1)).filter(i => i >= 0);
  matchAt = -1;
  const spans = $('tokens').children, set = new Set(matches);
  for (let j = 0; j < N; j++) spans[j].classList.toggle('match', set.has(j));
  $('search-count').textContent = s ? `${matches.length} match${matches.length === 1 ? '' : 'es'}` : '';
}

function gotoMatch(step) {
  if (!matches.length) return;
  matchAt = (matchAt + step + matches.length) % matches.length;
  const i = matches[matchAt];
  $('search-count').textContent = `${matchAt + 1} of ${matches.length}`;
  selectQuery(i);
  heat.centre(i, Math.min(i, heat.m.k - 1), Math.max(heat.s, 14));
  if (rollHeat) rollHeat.centre(i, i, Math.max(rollHeat.s, 14));
  $('tokens').children[i].scrollIntoView({block: 'nearest'});
}

function sortTable(th) {
  const col = +th.dataset.col, was = th.classList.contains('desc') ? 'desc' : th.classList.contains('asc') ? 'asc' : null;
  const desc = was ? was === 'asc' : col >= 2;
  document.querySelectorAll('#summary th').forEach(x => x.classList.remove('asc', 'desc'));
  th.classList.add(desc ? 'desc' : 'asc');
  const num = (r) => { const v = parseFloat(r.cells[col].dataset.v); return Number.isNaN(v) ? -Infinity : v; };
  const body = document.querySelector('#summary tbody'), rows = [...body.rows];
  rows.sort((a, b) => (num(a) - num(b)) * (desc ? -1 : 1) || a.dataset.l - b.dataset.l || a.dataset.h - b.dataset.h);
  body.append(...rows);
}

// ---- wiring ----
D.layers.forEach((li, p) => $('layer').add(new Option(`${li}`, p)));
D.tokens.forEach((t, i) => $('query').add(new Option(`${i}: ${short(t, 20)}`, i)));
[...$('tokens').children].forEach((s, i) => { s.onclick = () => selectQuery(i); });  // the page's escaped tokens
$('layer').onchange = () => openHead(+$('layer').value, cur.h);
$('head').onchange = () => openHead(cur.l, +$('head').value);
$('query').onchange = () => selectQuery(+$('query').value);
$('search').addEventListener('input', runSearch);
$('search').addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); gotoMatch(e.shiftKey ? -1 : 1); } });
$('search-next').onclick = () => gotoMatch(1);
$('search-prev').onclick = () => gotoMatch(-1);
document.addEventListener('keydown', (e) => {  // up/down: the previous/next query, outside form fields
  if (!['ArrowUp', 'ArrowDown'].includes(e.key) || e.target.closest('input, select, textarea')) return;
  e.preventDefault();
  selectQuery(Math.max(0, Math.min(N - 1, cur.q + (e.key === 'ArrowDown' ? 1 : -1))));
});
document.querySelectorAll('#summary th').forEach(th => th.addEventListener('click', () => sortTable(th)));
document.querySelectorAll('#summary tr.row').forEach(r => r.addEventListener('click', () => openHead(+r.dataset.l, +r.dataset.h, true)));
buildModelView();
openHead(cur.l, cur.h);
if (rollHeat) rollHeat.set(rolloutMap());
selectQuery(cur.q);
let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { buildModelView(); buildHeadView(); heat.draw(); if (rollHeat) rollHeat.draw(); }, 150);
});
window.attnzooViewer = {data: D, cur, heat, rollout: rollHeat, openHead, selectQuery};
})();
