// Runs the page's tracker (mobileinst/export/web_assets/tracker.js, video.js) in Node on what
// tests/test_web_tracker.py dumps from Python, and writes what it gives back:
//
//   node tests/web_tracker.js IN.json OUT.json
//
// IN: {assignment: [{rows, cols, cost}], tracker: {cfg, frames}, video: {opts, frames}} (each
// optional); OUT: the same keys, with the JavaScript results.
'use strict';
const fs = require('fs');
const path = require('path');

const assets = path.join(__dirname, '..', 'mobileinst', 'export', 'web_assets');
const T = require(path.join(assets, 'tracker.js'));
const V = require(path.join(assets, 'video.js'));

const f32 = (a) => Float32Array.from(a);
const trackList = (tracks) => tracks.map((t) => ({id: t.id, slot: t.slot, label: t.label, score: t.score}));

// SciPy's linear_sum_assignment, ported: col4row of each cost matrix
function assignment(cases) {
  return cases.map((c) => Array.from(T.linearSumAssignment(Float64Array.from(c.cost), c.rows, c.cols)));
}

// The Tracker fed exactly what Python's Tracker received: associate(kernels) on key frames, then
// update(frame, class_probs, maskness) in slot order; the alive tracks after every frame.
function tracker(dump) {
  const tr = new T.Tracker(dump.cfg);
  return dump.frames.map((f) => {
    if (!f.key) return {key: false, perm: null, alive: trackList(tr.alive())};
    const perm = Array.from(tr.associate(f32(f.kernels), f.n, f.e));
    tr.update(f.frame, f32(f.class_probs), f32(f.maskness), f.n, f.c);
    return {key: true, perm, alive: trackList(tr.alive())};
  });
}

// The page's VideoStream fed the raw graph outputs Python's VideoPredictor got from its network
function video(dump) {
  const vs = new V.VideoStream(dump.opts);
  const tensor = (t) => t && {data: f32(t.data), dims: t.dims};
  return dump.frames.map((f) => {
    const out = {logits: tensor(f.logits), objectness: tensor(f.objectness), kernels: tensor(f.kernels),
                 maskFeatures: tensor(f.mask_features)};
    const r = vs.step(out, f.geom);
    return {key: r.key, tracks: r.tracks.map((t) => ({id: t.id, slot: t.slot, label: t.label, score: t.score,
                                                       area: t.area, box: t.box, rle: V.rle(t.mask)}))};
  });
}

const dump = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = {};
if (dump.assignment) out.assignment = assignment(dump.assignment);
if (dump.tracker) out.tracker = tracker(dump.tracker);
if (dump.video) out.video = video(dump.video);
fs.writeFileSync(process.argv[3], JSON.stringify(out));
