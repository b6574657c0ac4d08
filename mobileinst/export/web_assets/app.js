/* mobileinst in the browser: onnxruntime-web runs the post-processed graph that
 * `mobileinst export --format web` wrote (labels, scores, masks at the input size); this script
 * decodes the image, letterboxes it as mobileinst/infer/preprocess.py does, crops and resizes the
 * masks as mobileinst/infer/results.py does, and draws. Camera frames are tracked instead, as
 * `mobileinst track --backend onnxruntime` tracks a video: the raw graphs (track.onnx on key
 * frames, track-features.onnx between them) and video.js / tracker.js (kernel reuse, kernel
 * association, track ids). Plain JavaScript, no build step, nothing fetched from the network:
 * model.json, the graphs and onnxruntime-web sit beside this file.
 *
 * window.mobileinst.ready          -> Promise of {ok, error, backend, threads, isolated}
 * window.mobileinst.runOnUrl(u)    -> Promise of {ok, error | name, width, height, timing, instances}
 * window.mobileinst.trackUrls(us)  -> Promise of {ok, error | frames: [{key, timing, tracks}]}: the
 *                                     images as one video's frames, through the camera's path
 *
 * URL parameters: backend, threads, conf (also the tracker's start score), and for tracking
 * reuse (key-frame interval), keep (the keep score, default conf / 2), patience.
 */
'use strict';
(function () {
  const META = 'model.json';
  const FORMAT = 'mobileinst-web';
  const FORMAT_VERSION = 2;
  const MAX_PIXELS = 100e6;   // larger images are refused (their RGBA alone would be 400 MB)
  const MAX_SIDE = 4096;      // larger sides are downscaled to DOWN_SIDE before inference
  const DOWN_SIDE = 2048;
  const ALPHA = 0.5;          // mask overlay opacity, as mobileinst/viz.py
  const REUSE_CHOICES = [1, 2, 3, 5, 10];
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const state = {meta: null, session: null, backend: 'wasm', threads: 1, isolated: false,
                 results: [], queue: Promise.resolve(), conf: 0.3, track: null, trackLoading: null};
  const isInt = (v) => Number.isInteger(v) && v > 0;

  function say(msg, kind) {
    const s = $('status');
    s.textContent = msg;
    s.className = kind || '';
  }
  window.addEventListener('error', (e) => say('error: ' + e.message, 'error'));
  window.addEventListener('unhandledrejection', (e) => say('error: ' + errText(e.reason), 'error'));
  function errText(e) { return (e && e.message) ? e.message : String(e); }
  const now = () => performance.now();

  // -- model.json ------------------------------------------------------------------------------
  async function loadMeta() {
    let r;
    try {
      r = await fetch(META, {cache: 'no-cache'});
    } catch (e) {
      throw new Error(`${META}: cannot be fetched (${errText(e)})`);
    }
    if (!r.ok) {
      throw new Error(`${META}: missing (HTTP ${r.status}): this folder is not a complete ` +
                      '`mobileinst export --format web` export; export it again');
    }
    let m;
    try {
      m = JSON.parse(await r.text());
    } catch (e) {
      throw new Error(`${META}: not valid JSON (${errText(e)}); export the model again`);
    }
    checkMeta(m);
    return m;
  }

  function checkMeta(m) {
    const bad = (key, want) => {
      throw new Error(`${META}: ${key} ${want}; export the model again (mobileinst export --format web)`);
    };
    if (!m || typeof m !== 'object' || Array.isArray(m)) bad('the file', 'must be a JSON object');
    if (m.format !== FORMAT) bad('"format"', `must be "${FORMAT}", got ${JSON.stringify(m.format)}`);
    if (!isInt(m.format_version)) bad('"format_version"', 'must be a positive integer');
    if (m.format_version > FORMAT_VERSION) {
      throw new Error(`${META}: format ${m.format_version} is newer than this page reads (${FORMAT_VERSION})`);
    }
    if (typeof m.model !== 'string' || !m.model) bad('"model"', 'must name the ONNX file');
    const names = m.class_names;
    if (!Array.isArray(names) || !names.length || !names.every((n) => typeof n === 'string')) {
      bad('"class_names"', 'must be a non-empty list of strings');
    }
    const colors = m.colors;
    if (!Array.isArray(colors) || !colors.length ||
        !colors.every((c) => Array.isArray(c) && c.length === 3 && c.every((v) => v >= 0 && v <= 255))) {
      bad('"colors"', 'must be a list of [r, g, b] 0..255');
    }
    const inp = m.input || {};
    if (!Array.isArray(inp.size) || inp.size.length !== 2 || !inp.size.every(isInt)) {
      bad('"input.size"', 'must be [height, width] in pixels');
    }
    if (inp.dtype !== 'uint8') bad('"input.dtype"', 'must be "uint8"');
    if (typeof inp.name !== 'string') bad('"input.name"', 'must be a string');
    if (!Array.isArray(inp.pad) || inp.pad.length !== 3) bad('"input.pad"', 'must be [r, g, b]');
    const out = m.outputs || {};
    for (const k of ['labels', 'scores', 'masks']) {
      if (typeof out[k] !== 'string') bad(`"outputs.${k}"`, 'must name a graph output');
    }
    for (const k of ['conf', 'default_conf']) {
      if (typeof m[k] !== 'number' || !(m[k] >= 0 && m[k] < 1)) bad(`"${k}"`, 'must be a number in [0, 1)');
    }
    checkTrackMeta(m.track, bad);
  }

  function checkTrackMeta(t, bad) {  // "track": the tracking graphs and settings (format 2)
    if (!t || typeof t !== 'object' || Array.isArray(t)) bad('"track"', 'must describe the tracking graphs');
    for (const k of ['key', 'features']) {
      if (typeof t[k] !== 'string' || !t[k]) bad(`"track.${k}"`, 'must name an ONNX file');
    }
    const out = t.outputs || {};
    for (const k of ['logits', 'objectness', 'kernels', 'mask_features']) {
      if (typeof out[k] !== 'string') bad(`"track.outputs.${k}"`, 'must name a graph output');
    }
    for (const k of ['mask_upsample', 'reuse']) {
      if (!isInt(t[k])) bad(`"track.${k}"`, 'must be a positive integer');
    }
    if (!(Number.isInteger(t.patience) && t.patience >= 0)) bad('"track.patience"', 'must be an integer >= 0');
    if (typeof t.mask_threshold !== 'number' || !(t.mask_threshold >= 0 && t.mask_threshold < 1)) {
      bad('"track.mask_threshold"', 'must be a number in [0, 1)');
    }
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement('script');
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error(`${src}: missing or not loadable; export the model again ` +
                                         "(it copies onnxruntime-web's files into the folder)"));
      document.head.appendChild(s);
    });
  }

  // -- start-up --------------------------------------------------------------------------------
  async function createSession(backend, file = state.meta.model) {
    return ort.InferenceSession.create(file, {executionProviders: [backend], graphOptimizationLevel: 'all'});
  }

  async function init() {
    say(`loading ${META}…`);
    state.meta = await loadMeta();
    for (const src of ['ort.min.js', 'tracker.js', 'video.js']) await loadScript(src);
    state.isolated = self.crossOriginIsolated === true;
    const cores = navigator.hardwareConcurrency || 1;
    const asked = parseInt(params.get('threads') || '', 10);
    const want = asked >= 1 ? asked : Math.min(4, Math.ceil(cores / 2));  // onnxruntime-web's default
    state.threads = state.isolated ? want : 1;
    state.backend = params.get('backend') === 'webgpu' ? 'webgpu' : 'wasm';
    const notes = [];
    if (state.backend === 'webgpu' && !navigator.gpu) {
      notes.push('WebGPU is not available in this browser: using WASM');
      state.backend = 'wasm';
    }
    ort.env.wasm.numThreads = state.threads;
    ort.env.wasm.wasmPaths = new URL('./', location.href).href;
    ort.env.logLevel = 'error';
    say(`loading ${state.meta.model} (${state.backend})…`);
    try {
      state.session = await createSession(state.backend);
    } catch (e) {
      if (state.backend === 'wasm') throw new Error(`${state.meta.model}: cannot be loaded (${errText(e)})`);
      notes.push(`WebGPU failed (${errText(e).slice(0, 200)}): using WASM`);
      state.backend = 'wasm';
      state.session = await createSession('wasm');
    }
    const outs = state.session.outputNames;
    for (const k of ['labels', 'scores', 'masks']) {
      if (!outs.includes(state.meta.outputs[k])) {
        throw new Error(`${META}: output "${state.meta.outputs[k]}" is not in ${state.meta.model} ` +
                        `(it has ${outs.join(', ')}): the metadata belongs to another model`);
      }
    }
    if (!state.isolated) {
      notes.push('1 thread: the page is not cross-origin isolated (serve the folder with ' +
                 '`mobileinst serve DIR`, which sends the COOP/COEP headers; browsers isolate ' +
                 'only https:// or localhost pages)');
    }
    setupControls();
    const m = state.meta;
    $('model').textContent = `${m.model_name} · ${m.class_names.length} classes · ` +
      `${m.input.size[0]}×${m.input.size[1]} · onnxruntime-web ${(window.ort && ort.env.versions &&
      ort.env.versions.web) || m.ort_web_version}`;
    say(`ready: ${state.backend.toUpperCase()}, ${state.threads} thread${state.threads > 1 ? 's' : ''}` +
        (notes.length ? ' · ' + notes.join(' · ') : ''), notes.length ? 'warn' : '');
    return {ok: true, backend: state.backend, threads: state.threads, isolated: state.isolated, notes};
  }

  function setupControls() {
    const conf = $('conf');
    conf.min = String(state.meta.conf);
    state.conf = Number(params.get('conf') || state.meta.default_conf);
    conf.value = String(state.conf);
    $('confval').textContent = state.conf.toFixed(2);
    conf.addEventListener('input', () => {
      state.conf = Number(conf.value);
      $('confval').textContent = state.conf.toFixed(2);
      if (state.track) state.track.stream.tracker.cfg.startScore = state.conf;
      for (const r of state.results) draw(r);
    });
    const threads = $('threads');
    const cores = navigator.hardwareConcurrency || 1;
    const choices = state.isolated ? Array.from({length: Math.max(cores, state.threads)}, (_, i) => i + 1) : [1];
    threads.innerHTML = choices.map((n) => `<option value="${n}">${n}</option>`).join('');
    threads.value = String(state.threads);
    threads.disabled = !state.isolated;
    const backend = $('backend');
    backend.value = state.backend;
    if (!navigator.gpu) backend.querySelector('option[value="webgpu"]').disabled = true;
    // onnxruntime-web fixes its backend and thread count when it first starts: reload to change them
    const reload = () => {
      params.set('backend', backend.value);
      params.set('threads', threads.value);
      location.search = params.toString();
    };
    backend.addEventListener('change', reload);
    threads.addEventListener('change', reload);
    if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
      $('camera').hidden = false;
      $('camera').addEventListener('click', () => camera(!cam.on));
      setupReuse();
    }
  }

  function setupReuse() {  // the key-frame interval of tracking, changed between frames
    const reuse = $('reuse');
    const start = trackSettings().reuse;
    const choices = [...new Set([...REUSE_CHOICES, start])].sort((a, b) => a - b);
    reuse.innerHTML = choices.map((n) => `<option value="${n}">${n}</option>`).join('');
    reuse.value = String(start);
    $('reuselabel').hidden = false;
    reuse.addEventListener('change', () => {
      params.set('reuse', reuse.value);  // for a stream not made yet
      if (state.track) state.track.stream.reuse = Number(reuse.value);
    });
  }

  function setupInputs() {  // at once, so that a file dropped before (or without) a model is a message
    $('files').addEventListener('change', (e) => { for (const f of e.target.files) enqueue(f, f.name); });
    const over = (e) => { e.preventDefault(); $('drop').classList.add('over'); };
    const leave = () => $('drop').classList.remove('over');
    window.addEventListener('dragover', over);  // anywhere on the page, never the browser's own
    window.addEventListener('dragleave', leave);
    window.addEventListener('drop', (e) => {
      e.preventDefault();
      leave();
      for (const f of e.dataTransfer.files) enqueue(f, f.name);
    });
  }

  // -- images ----------------------------------------------------------------------------------
  async function decode(blob, name) {
    if (blob.type && !blob.type.startsWith('image/')) {
      throw new Error(`${name}: not an image (${blob.type}, ${blob.size} bytes)`);
    }
    let bmp;
    try {
      bmp = await createImageBitmap(blob, {colorSpaceConversion: 'none', premultiplyAlpha: 'none',
                                           imageOrientation: 'from-image'});
    } catch (e) {
      throw new Error(`${name}: not an image this browser can decode (${blob.type || 'unknown type'}, ` +
                      `${blob.size} bytes)`);
    }
    const w0 = bmp.width, h0 = bmp.height;
    let note = '';
    if (w0 * h0 > MAX_PIXELS) {
      bmp.close();
      throw new Error(`${name}: ${w0}×${h0} pixels is too large (at most ${MAX_PIXELS / 1e6} MP)`);
    }
    if (Math.max(w0, h0) > MAX_SIDE) {  // the network sees a few hundred pixels anyway
      const s = DOWN_SIDE / Math.max(w0, h0);
      const w = Math.max(1, Math.round(w0 * s)), h = Math.max(1, Math.round(h0 * s));
      const small = await createImageBitmap(bmp, {resizeWidth: w, resizeHeight: h, resizeQuality: 'medium'});
      bmp.close();
      bmp = small;
      note = `downscaled from ${w0}×${h0} to ${w}×${h} before inference`;
    }
    return {...pixels(bmp), note};
  }

  function pixels(bmp) {  // an ImageBitmap -> its RGBA bytes
    const canvas = document.createElement('canvas');
    canvas.width = bmp.width;
    canvas.height = bmp.height;
    const ctx = canvas.getContext('2d', {willReadFrequently: true});
    ctx.drawImage(bmp, 0, 0);
    const rgba = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
    return {bmp, rgba, w: bmp.width, h: bmp.height, note: ''};
  }

  // Python's round(): half to even (infer/preprocess.py sizes the letterbox with it)
  function roundHalfEven(x) {
    const r = Math.round(x);
    return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
  }

  // OpenCV's INTER_LINEAR coefficients (opencv imgproc/src/resize.cpp, resize()): half-pixel
  // centres, float32 arithmetic, weights in 11-bit fixed point, border pixels replicated; the
  // weight is clamped to the border along x only (`clamp`), rows are clamped when fetched.
  function coeffs(src, dst, clamp) {
    const scale = 1 / (dst / src);
    const s0 = new Int32Array(dst), s1 = new Int32Array(dst), a0 = new Int32Array(dst), a1 = new Int32Array(dst);
    for (let d = 0; d < dst; d++) {
      let f = Math.fround((d + 0.5) * scale - 0.5);
      let s = Math.floor(f);
      f = Math.fround(f - s);
      if (clamp && s < 0) { s = 0; f = 0; }
      if (clamp && s >= src - 1) { s = src - 1; f = 0; }
      s0[d] = Math.min(Math.max(s, 0), src - 1);
      s1[d] = Math.min(Math.max(s + 1, 0), src - 1);
      a0[d] = roundHalfEven(Math.fround(Math.fround(1 - f) * 2048));
      a1[d] = roundHalfEven(Math.fround(f * 2048));
    }
    return {s0, s1, a0, a1};
  }

  // cv2.resize(..., INTER_LINEAR) of uint8 pixels: src (sh rows of `stride` values, pixel x
  // channel c at x * sc + c) -> (dh, dw, oc) with the first oc channels. The vertical pass rounds
  // as OpenCV's SIMD path does (VResizeLinearVec_32s8u: ((b * (S >> 4)) >> 16 summed + 2) >> 2):
  // bit-exact with opencv-python's cv2.resize on x86-64 (tests/test_web.py compares the masks).
  function resize(src, sw, sh, stride, sc, oc, dw, dh) {
    const cx = coeffs(sw, dw, true), cy = coeffs(sh, dh, false);
    const rows = new Map();
    const hrow = (y) => {
      let r = rows.get(y);
      if (r) return r;
      r = new Int32Array(dw * oc);
      const base = y * stride;
      for (let x = 0; x < dw; x++) {
        const p0 = base + cx.s0[x] * sc, p1 = base + cx.s1[x] * sc, w0 = cx.a0[x], w1 = cx.a1[x];
        for (let c = 0; c < oc; c++) r[x * oc + c] = src[p0 + c] * w0 + src[p1 + c] * w1;
      }
      rows.set(y, r);
      if (rows.size > 4) rows.delete(rows.keys().next().value);
      return r;
    };
    const out = new Uint8Array(dw * dh * oc);
    for (let y = 0; y < dh; y++) {
      const r0 = hrow(cy.s0[y]), r1 = hrow(cy.s1[y]), b0 = cy.a0[y], b1 = cy.a1[y];
      const o = y * dw * oc;
      for (let i = 0; i < dw * oc; i++) {
        const v = (((b0 * (r0[i] >> 4)) >> 16) + ((b1 * (r1[i] >> 4)) >> 16) + 2) >> 2;
        out[o + i] = v < 0 ? 0 : v > 255 ? 255 : v;
      }
    }
    return out;
  }

  // infer/preprocess.py letterbox: resize to fit (aspect kept), pad bottom/right with the mean
  function letterbox(img) {
    const [H, W] = state.meta.input.size;
    const scale = Math.min(H / img.h, W / img.w);
    const h = Math.min(H, Math.max(1, roundHalfEven(img.h * scale)));
    const w = Math.min(W, Math.max(1, roundHalfEven(img.w * scale)));
    const rgb = (h === img.h && w === img.w) ? null : resize(img.rgba, img.w, img.h, img.w * 4, 4, 3, w, h);
    const data = new Uint8Array(3 * H * W);
    const pad = state.meta.input.pad;
    for (let c = 0; c < 3; c++) data.fill(pad[c], c * H * W, (c + 1) * H * W);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = y * W + x;
        if (rgb) {
          const p = (y * w + x) * 3;
          data[i] = rgb[p]; data[H * W + i] = rgb[p + 1]; data[2 * H * W + i] = rgb[p + 2];
        } else {
          const p = (y * img.w + x) * 4;
          data[i] = img.rgba[p]; data[H * W + i] = img.rgba[p + 1]; data[2 * H * W + i] = img.rgba[p + 2];
        }
      }
    }
    return {data, h, w};
  }

  // infer/results.py resize_masks: crop the image's (h, w), resize to the original size, > 0
  function instanceMask(masks, k, size, h, w, oh, ow) {
    const [H, W] = size;
    const off = k * H * W;
    let m;
    if (h === oh && w === ow) {
      m = new Uint8Array(oh * ow);
      for (let y = 0; y < h; y++) m.set(masks.subarray(off + y * W, off + y * W + w), y * w);
    } else {
      m = resize(masks.subarray(off, off + H * W), w, h, W, 1, 1, ow, oh);
    }
    let x0 = ow, y0 = oh, x1 = -1, y1 = -1, area = 0;
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        if (m[y * ow + x]) {
          m[y * ow + x] = 1;
          area++;
          if (x < x0) x0 = x;
          if (x > x1) x1 = x;
          if (y < y0) y0 = y;
          if (y > y1) y1 = y;
        }
      }
    }
    return {mask: m, area, box: area ? [x0, y0, x1 + 1, y1 + 1] : [0, 0, 0, 0]};
  }

  async function infer(blob, name) {
    if (!state.session) throw new Error(`no model loaded (${$('status').textContent})`);
    const t0 = now();
    const img = await decode(blob, name);
    const result = await detect(img, name, t0);
    addCard(result);
    finish(result);
    return result;
  }

  function finish(result) {  // post-processing ends when the overlay is drawn
    const t = now();
    result.timing.post = t - result.t3;
    result.timing.total = t - result.t0;
    caption(result);
  }

  // the network on a decoded image (decoding started at t0) -> a result without its drawing
  async function detect(img, name, t0) {
    const t1 = now();
    const {data, h, w} = letterbox(img);
    const [H, W] = state.meta.input.size;
    const feeds = {[state.meta.input.name]: new ort.Tensor('uint8', data, [1, 3, H, W])};
    const t2 = now();
    const out = await state.session.run(feeds);
    const t3 = now();
    const o = state.meta.outputs;
    const labels = out[o.labels].data, scores = out[o.scores].data, masks = out[o.masks].data;
    const instances = [];
    for (let k = 0; k < scores.length; k++) {
      if (!(scores[k] > 0)) continue;  // an empty slot (batch > 1 graphs only)
      const label = Number(labels[k]);
      instances.push({label, name: state.meta.class_names[label] ?? String(label), score: scores[k],
                      ...instanceMask(masks, k, [H, W], h, w, img.h, img.w)});
    }
    return {name, w: img.w, h: img.h, note: img.note, bmp: img.bmp, instances, t0, t3,
            timing: {decode: t1 - t0, pre: t2 - t1, network: t3 - t2}};
  }

  // -- tracking: kernel reuse + association (video.js, tracker.js), as `mobileinst track` -----------
  function trackSettings() {  // model.json's defaults, overridden by the URL's
    const t = state.meta.track, num = (k, d) => (params.has(k) ? Number(params.get(k)) : d);
    return {reuse: Math.max(1, Math.round(num('reuse', t.reuse))),
            patience: Math.max(0, Math.round(num('patience', t.patience))),
            keepScore: num('keep', null)};
  }

  async function openTrackGraph(file, outputs) {
    let session;
    try {
      session = await createSession(state.backend, file);
    } catch (e) {
      throw new Error(`${file}: cannot be loaded (${errText(e)}); export the model again`);
    }
    const missing = outputs.filter((o) => !session.outputNames.includes(o));
    if (missing.length) {
      throw new Error(`${META}: ${file} has no output ${missing.join(', ')} (it has ` +
                      `${session.outputNames.join(', ')}): the metadata belongs to another model`);
    }
    return session;
  }

  // the tracking graphs' sessions and the stream's state, made once, on first use (not for images)
  function trackState() {
    if (!state.trackLoading) state.trackLoading = loadTrack().catch((e) => { state.trackLoading = null; throw e; });
    return state.trackLoading;
  }

  async function loadTrack() {
    const t = state.meta.track, o = t.outputs, before = [$('status').textContent, $('status').className];
    say(`loading ${t.key} and ${t.features} (tracking)…`);
    const key = await openTrackGraph(t.key, [o.logits, o.objectness, o.kernels, o.mask_features]);
    const features = await openTrackGraph(t.features, [o.mask_features]);
    const {reuse, patience, keepScore} = trackSettings();
    const stream = new window.mobileinstVideo.VideoStream({
      maskUpsample: t.mask_upsample, maskThreshold: t.mask_threshold, reuse, patience, keepScore, startScore: state.conf});
    state.track = {key, features, stream};
    say(...before);
    return state.track;
  }

  // one video frame (decoding started at t0) through the tracking graphs -> a result with track ids
  async function trackFrame(img, name, t0) {
    const {key, features, stream} = state.track;
    const t1 = now();
    const {data, h, w} = letterbox(img);
    const [H, W] = state.meta.input.size;
    const session = stream.isKey() ? key : features;
    const feeds = {[session.inputNames[0]]: new ort.Tensor('uint8', data, [1, 3, H, W])};
    const t2 = now();
    const out = await session.run(feeds);
    const t3 = now();
    const o = state.meta.track.outputs;
    const r = stream.step({logits: out[o.logits], objectness: out[o.objectness], kernels: out[o.kernels],
                           maskFeatures: out[o.mask_features]}, {padded: [H, W], size: [h, w], orig: [img.h, img.w]});
    const instances = r.tracks.map((d) => ({...d, name: state.meta.class_names[d.label] ?? String(d.label)}));
    return {name, w: img.w, h: img.h, note: img.note, bmp: img.bmp, instances, tracked: true, key: r.key,
            reuse: stream.reuse, t0, t3, timing: {decode: t1 - t0, pre: t2 - t1, network: t3 - t2}};
  }

  function showFrame(holder, r) {  // a video's frame, drawn on the video's one card
    if (holder.result) {
      holder.result.bmp.close();
      Object.assign(holder.result, r);
      draw(holder.result);
    } else {
      holder.result = r;
      addCard(r);
    }
    finish(holder.result);
  }

  // -- camera: every frame tracked, drawn on one card ------------------------------------------
  const cam = {on: false, video: null, stream: null, result: null, frames: 0, loop: null};

  async function camera(on) {
    if (!on) {
      cam.on = false;
      if (cam.loop) await cam.loop;
      if (cam.stream) cam.stream.getTracks().forEach((t) => t.stop());
      cam.stream = null;
      $('camera').textContent = 'camera';
      return {ok: true, frames: cam.frames};
    }
    if (cam.on) return {ok: true, frames: cam.frames};
    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error('this browser gives no camera to this page (cameras need https:// or localhost)');
      }
      await trackState();
      cam.stream = await navigator.mediaDevices.getUserMedia(
        {video: {facingMode: 'environment', width: {ideal: 640}, height: {ideal: 480}}, audio: false});
      cam.video = document.createElement('video');
      Object.assign(cam.video, {muted: true, playsInline: true, srcObject: cam.stream});
      await cam.video.play();
    } catch (e) {
      const msg = `camera: ${errText(e)}${e && e.name && e.name !== 'Error' ? ` (${e.name})` : ''}`;
      say(msg, 'error');
      return {ok: false, error: msg};
    }
    cam.on = true;
    cam.frames = 0;
    cam.result = null;
    $('camera').textContent = 'stop camera';
    cam.loop = state.queue = state.queue.then(cameraLoop).catch((e) => say(`camera: ${errText(e)}`, 'error'));
    return {ok: true, frames: 0};
  }

  async function cameraLoop() {
    state.track.stream.reset();  // a new video: frame 0 is a key frame, ids start at 1
    while (cam.on) {
      const t0 = now();
      const bmp = await createImageBitmap(cam.video);
      showFrame(cam, await trackFrame(pixels(bmp), 'camera', t0));
      cam.frames++;
      await new Promise((resolve) => requestAnimationFrame(resolve));
    }
  }

  // -- drawing ---------------------------------------------------------------------------------
  function addCard(result) {
    const card = document.createElement('div');
    card.className = 'card';
    const canvas = document.createElement('canvas');
    const info = document.createElement('div');
    info.className = 'meta';
    card.append(canvas, info);
    $('results').prepend(card);
    Object.assign(result, {card, canvas, info});
    state.results.push(result);
    draw(result);
  }

  function shown(result) {  // a tracked frame shows its alive tracks (the tracker applied conf)
    return result.tracked ? result.instances : result.instances.filter((d) => d.score > state.conf);
  }

  // an image's instances: colours by rank; a video's tracks: by id, as `mobileinst track`
  function colorOf(result, d, i) {
    const colors = state.meta.colors;
    return colors[(result.tracked ? d.id : i) % colors.length];
  }

  function labelOf(result, d) {
    return `${result.tracked ? `#${d.id} ` : ''}${d.name} ${d.score.toFixed(2)}`;
  }

  function draw(result) {
    const {canvas, bmp, w, h} = result;
    canvas.width = w;
    canvas.height = h;
    canvas.style.width = `${Math.min(640, Math.max(w, 320))}px`;  // small images shown larger
    const ctx = canvas.getContext('2d');
    ctx.drawImage(bmp, 0, 0);
    const keep = shown(result);
    if (keep.length) {
      const im = ctx.getImageData(0, 0, w, h);
      const px = im.data;
      keep.forEach((d, i) => {
        const c = colorOf(result, d, i);
        const m = d.mask;
        for (let p = 0, q = 0; p < m.length; p++, q += 4) {
          if (m[p]) {
            px[q] = px[q] * (1 - ALPHA) + c[0] * ALPHA;
            px[q + 1] = px[q + 1] * (1 - ALPHA) + c[1] * ALPHA;
            px[q + 2] = px[q + 2] * (1 - ALPHA) + c[2] * ALPHA;
          }
        }
      });
      ctx.putImageData(im, 0, 0);
      ctx.font = `${Math.max(11, Math.round(Math.min(w, h) / 30))}px sans-serif`;
      ctx.textBaseline = 'top';
      keep.forEach((d, i) => {
        const c = colorOf(result, d, i);
        const text = labelOf(result, d);
        const tw = ctx.measureText(text).width + 4, th = parseInt(ctx.font, 10) + 4;
        const x = Math.min(d.box[0], Math.max(0, w - tw)), y = Math.min(d.box[1], Math.max(0, h - th));
        ctx.fillStyle = `rgb(${c[0]},${c[1]},${c[2]})`;
        ctx.fillRect(x, y, tw, th);
        ctx.fillStyle = '#000';
        ctx.fillText(text, x + 2, y + 2);
      });
    }
    if (result.timing.total !== undefined) caption(result);
  }

  function caption(result) {
    const t = result.timing, f = (v) => v.toFixed(1);
    const what = result.tracked
      ? `${shown(result).length} tracks · ${result.key ? 'key frame' : 'kernels reused'} (reuse ${result.reuse})`
      : `${shown(result).length} instances > ${state.conf.toFixed(2)}`;
    result.info.textContent = `${result.name}: ${what} · ` +
      `pre ${f(t.pre)} ms · network ${f(t.network)} ms · post ${f(t.post)} ms · ` +
      `decode ${f(t.decode)} ms · ${state.backend} ${state.threads}T` + (result.note ? ` · ${result.note}` : '');
  }

  function showError(name, e) {
    const card = document.createElement('div');
    card.className = 'card';
    const msg = document.createElement('div');
    msg.className = 'error';
    msg.textContent = errText(e).startsWith(name) ? errText(e) : `${name}: ${errText(e)}`;
    card.append(msg);
    $('results').prepend(card);
    return msg.textContent;
  }

  function enqueue(blob, name) {  // one image at a time: a session runs one call at once
    const job = state.queue.then(() => infer(blob, name)).catch((e) => { showError(name, e); throw e; });
    state.queue = job.catch(() => {});
    return job;
  }

  // -- for tests and benchmarks ------------------------------------------------------------------
  const nameOf = (url) => decodeURIComponent(url.split('/').pop() || url);

  async function fetchBlob(url, name) {
    const resp = await fetch(url);
    if (!resp.ok) throw new Error(`${name}: HTTP ${resp.status}`);
    return resp.blob();
  }

  function instanceJson(d) {  // mask as row-major run lengths (video.js `rle`)
    return {...(d.id === undefined ? {} : {id: d.id}), label: d.label, name: d.name, score: d.score,
            box: d.box, area: d.area, rle: window.mobileinstVideo.rle(d.mask)};
  }

  async function runOnUrl(url, conf) {
    await ready;
    if (!state.session) return {ok: false, error: $('status').textContent};
    const name = nameOf(url);
    let r;
    try {
      r = await enqueue(await fetchBlob(url, name), name);
    } catch (e) {
      return {ok: false, error: errText(e), shown: $('results').firstChild.textContent};
    }
    const cut = conf === undefined ? state.conf : conf;
    return {ok: true, name, width: r.w, height: r.h, note: r.note, timing: r.timing,
            backend: state.backend, threads: state.threads,
            instances: r.instances.filter((d) => d.score > cut).map(instanceJson)};
  }

  // the images at `urls` as the frames of one video, tracked through the camera's path
  async function trackUrls(urls) {
    await ready;
    if (!state.session) return {ok: false, error: $('status').textContent};
    const holder = {result: null}, frames = [];
    const job = async () => {
      await trackState();
      state.track.stream.reset();
      for (const url of urls) {
        const name = nameOf(url), t0 = now();
        showFrame(holder, await trackFrame(await decode(await fetchBlob(url, name), name), name, t0));
        const r = holder.result;
        frames.push({name, key: r.key, timing: {...r.timing}, tracks: r.instances.map(instanceJson)});
      }
    };
    const run = state.queue.then(job);
    state.queue = run.catch(() => {});
    try {
      await run;
    } catch (e) {
      say(errText(e), 'error');
      return {ok: false, error: errText(e)};
    }
    return {ok: true, frames};
  }

  setupInputs();
  const ready = init().catch((e) => {
    say(errText(e), 'error');
    return {ok: false, error: errText(e)};
  });
  window.mobileinst = {ready, runOnUrl, trackUrls, camera, state, cam, resize};
})();
