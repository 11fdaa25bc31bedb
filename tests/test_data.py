"Contracts of the data chapter (vla_nb.data): resumable deterministic generation, episode-atomic format, validation, training view."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import (SyntheticDataGenerator, DataConfig, EpisodeDataset, EpisodeWriter, ChunkDataset, ArrayNormalizer,
                         Normalizer, compute_stats, encode_episode, cut_chunks, augment_images, check_observation,
                         validate_dataset, plan_episodes, split_episodes, object_targets, IMAGE, WRIST_IMAGE, PROPRIO, ACTION,
                         ACTION_PAD, TOKENS, SUCCESS, TIMESTAMP, STD_EPS, OBJECT_NAMES)
from vla_nb.data import _data_scaling


def _arrays(root):
    ds = EpisodeDataset(root)
    return {e['episode_index']: ds.load_episode(k) for k, e in enumerate(ds.episodes)}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')/'small'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=8, seed=3, image_size=48)).generate_dataset(progress_bar=False)
    return root


def test_generated_dataset_is_valid_and_balanced(small):
    assert validate_dataset(small) == []
    ds = EpisodeDataset(small)
    assert len(ds) + len(ds.failures) == 8
    assert {e['task']['family'] for e in ds.episodes} == {'pick', 'move', 'find', 'place'}
    assert all(np.abs(ds.load_episode(k)[ACTION]).max() <= 1 for k in range(len(ds)))
    assert all(ds.load_episode(k)['success'][-1] for k in range(len(ds)))    # only successful episodes are stored


def test_same_dataset_for_one_or_two_workers(small, tmp_path):
    cfg = DataConfig(root=str(tmp_path/'w2'), num_episodes=8, seed=3, workers=2, image_size=48)
    rep = SyntheticDataGenerator(cfg).generate_dataset(progress_bar=False)
    t = rep['timing']                                       # where the time went: start-up, each worker, the parent
    assert sum(w['episodes'] for w in t['workers']) == 8 and len(t['workers']) == 2
    assert 0 < t['startup_s'] < t['record_s'] <= rep['seconds'] and t['finalize_s'] > 0
    assert all(0 < w['busy_fraction'] <= 1 and 0 < w['cpu_per_busy_s'] for w in t['workers'])
    a, b = _arrays(small), _arrays(tmp_path/'w2')
    assert a.keys() == b.keys()
    for i in a:
        for k in a[i]: np.testing.assert_array_equal(a[i][k], b[i][k])


def test_killed_run_resumes_to_the_same_dataset(small, tmp_path):
    "SIGKILL a generator mid-run, restart it: the result is complete, valid and identical to an uninterrupted run."
    root = tmp_path/'killed'
    code = (f"from vla_nb.data import *; SyntheticDataGenerator(DataConfig(root={str(root)!r}, num_episodes=8, seed=3, image_size=48))"
            ".generate_dataset(progress_bar=False)")
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index, t0 = root/'meta/episodes.jsonl', time.time()
    while time.time() - t0 < 120 and not (index.exists() and index.read_bytes().count(b'\n') >= 3): time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    n_before = index.read_bytes().count(b'\n')
    assert 3 <= n_before < 8, n_before
    assert len(EpisodeDataset(root)) == n_before          # a reader sees the complete episodes only
    failed_before = len(EpisodeDataset(root).failures)
    rep = SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=8, seed=3, image_size=48)).generate_dataset(progress_bar=False)
    assert rep['new_episodes'] == 8 - n_before - failed_before     # only the missing episodes were recorded
    assert validate_dataset(root) == []
    a, b = _arrays(small), _arrays(root)
    assert a.keys() == b.keys()
    for i in a: np.testing.assert_array_equal(a[i][IMAGE], b[i][IMAGE])


def test_heldout_split_never_meets_training():
    cfg = DataConfig(num_episodes=300)
    train, held = plan_episodes(cfg), plan_episodes(cfg.replace(split='heldout', num_episodes=60))
    key = lambda p: (p['task']['family'], p['task']['obj'], p['task']['loc'], p['template'])
    assert not {key(p) for p in train} & {key(p) for p in held}
    assert {(p['task']['obj'], p['task']['loc']) for p in held if p['task']['family'] == 'place'} == set(cfg.heldout_pairs)


def test_validator_reports_problems(small, tmp_path):
    import shutil
    root = tmp_path/'broken'; shutil.copytree(small, root)
    (root/'meta/stats.json').unlink()
    ep = root/EpisodeDataset(root).episodes[0]['file']
    ep.write_bytes(ep.read_bytes()[:100])
    probs = validate_dataset(root)
    assert any('stats.json' in p for p in probs) and any('sha256' in p for p in probs)
    (root/'meta/info.json').write_text('{not json')
    assert 'corrupt' in validate_dataset(root)[0]


def test_chunk_dataset_contract(small):
    ds = EpisodeDataset(small)
    tr, va = split_episodes(len(ds), 0.25, seed=1)
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(len(ds)))
    cd = ChunkDataset(ds, tr, chunk_size=6)
    s = cd[0]
    assert s[IMAGE].shape == (3, 48, 48) and s[ACTION].shape == (6, 7) and s[TOKENS].dtype == torch.int64
    fr, row = ds.frames(), int(cd.cols['row'][0])                          # the values: normalized frames of that row on
    pix = torch.from_numpy(np.array(fr[IMAGE][row])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(s[IMAGE], (pix - torch.tensor(ds.stats[IMAGE]['mean']).float().view(3, 1, 1))
                               / torch.tensor(ds.stats[IMAGE]['std']).float().view(3, 1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s[ACTION], cd.norm.normalize(ACTION, torch.from_numpy(np.array(fr[ACTION][row:row + 6]))))
    torch.testing.assert_close(s[PROPRIO], cd.norm.normalize(PROPRIO, torch.from_numpy(np.array(fr[PROPRIO][row]))))
    last = int(np.flatnonzero(cd.cols['row'] == cd.cols['end'] - 1)[0])    # the last frame of the first episode
    assert cd[last][ACTION_PAD].tolist() == [False] + [True] * 5 and not cd[last - 1][ACTION_PAD][:2].any()
    assert not cd[0][ACTION_PAD].any()
    tok = ds.tokenizer
    assert tok.decode(s[TOKENS]) == ' '.join(tok.tok.encode(ds.episodes[tr[0]]['command']).tokens)


def test_tokenizer_round_trip_and_errors():
    tok = CommandTokenizer.build(command_corpus(), max_len=12)
    ids, mask = tok.encode('Put the GREEN ball on the shelf.')
    assert tok.decode(ids) == 'put the green ball on the shelf' and mask.sum() == 7
    with pytest.raises(ValueError, match=r"\['ball2'\]"): tok.encode('put the ball2 on the shelf')
    with pytest.raises(ValueError, match='got NoneType'): tok.encode(None)
    with pytest.raises(ValueError, match='at most 12'): tok.encode('the ' * 13)     # never silently truncated
    assert tok.decode(tok.encode('put the ball2 on the shelf', allow_unknown=True)[0]) == 'put the <unk> on the shelf'


def test_writer_refuses_bad_episodes(tmp_path):
    w = EpisodeWriter(tmp_path/'w', fps=10)
    ok = {IMAGE: np.zeros((3, 8, 8, 3), np.uint8), PROPRIO: np.zeros((3, 15), np.float32), ACTION: np.zeros((3, 7), np.float32)}
    with pytest.raises(ValueError, match='uint8'): w.add_episode(0, {**ok, IMAGE: np.zeros((3, 8, 8, 3), np.float32)}, 'find the book')
    with pytest.raises(ValueError, match='different lengths'): w.add_episode(0, {**ok, ACTION: np.zeros((2, 7), np.float32)}, 'find the book')
    with pytest.raises(ValueError, match='required'): w.add_episode(0, {IMAGE: ok[IMAGE]}, 'find the book')
    with pytest.raises(ValueError, match='no episodes'): w.finalize()


def test_episodes_read_in_index_order_whatever_the_write_order(tmp_path):
    "Recording workers finish in any order; the dataset lists episodes by index, so train/val splits are reproducible."
    w = EpisodeWriter(tmp_path/'w', fps=10)
    for i in (2, 0, 1):
        T = 3 + i
        w.add_episode(i, {IMAGE: np.full((T, 8, 8, 3), i, np.uint8), PROPRIO: np.zeros((T, 15), np.float32),
                          ACTION: np.zeros((T, 7), np.float32)}, 'find the book')
    ds = w.finalize()
    assert [e['episode_index'] for e in ds.episodes] == [0, 1, 2]
    assert [ds.load_episode(k)[IMAGE].shape[0] for k in range(3)] == [3, 4, 5]
    assert [int(ds.load_episode(k)[IMAGE][0, 0, 0, 0]) for k in range(3)] == [0, 1, 2]


# ---- statistics, normalizers ----

def _hand_dataset(root, lengths=(3, 5), seed=0, wrist=False):
    "A finalized dataset of random episodes with known arrays; returns (dataset, the episodes' frames in index order)."
    g, w, eps = np.random.default_rng(seed), EpisodeWriter(root, fps=10), []
    for i, T in enumerate(lengths):
        f = {IMAGE: g.integers(0, 256, (T, 8, 8, 3), dtype=np.uint8), PROPRIO: g.normal(2, 3, (T, 15)).astype(np.float32),
             ACTION: g.uniform(-1, 1, (T, 7)).astype(np.float32), SUCCESS: np.arange(T) == T - 1, TIMESTAMP: np.arange(T) / 10}
        if wrist: f[WRIST_IMAGE] = g.integers(0, 256, (T, 4, 4, 3), dtype=np.uint8)
        w.add_episode(i, f, 'find the book'); eps.append(f)
    return w.finalize(), eps


def test_compute_stats_matches_a_hand_computation(tmp_path):
    ds, eps = _hand_dataset(tmp_path/'d', (3, 5, 2))
    st = compute_stats(ds)
    assert set(st) == {IMAGE, PROPRIO, ACTION}                              # success flags and timestamps are not normalized
    img = np.concatenate([e[IMAGE] for e in eps]).reshape(-1, 3) / 255.     # every pixel of every frame, per channel
    for key, x in ((IMAGE, img), (PROPRIO, np.concatenate([e[PROPRIO] for e in eps]).astype(np.float64)),
                   (ACTION, np.concatenate([e[ACTION] for e in eps]).astype(np.float64))):
        np.testing.assert_allclose(st[key]['mean'], x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(st[key]['std'], x.std(0), rtol=1e-7)   # population std, as LeRobot's
        np.testing.assert_array_equal(st[key]['min'], x.min(0)); np.testing.assert_array_equal(st[key]['max'], x.max(0))
        assert st[key]['count'].tolist() == [len(x)]
    assert st[IMAGE]['count'].tolist() == [10 * 64]
    for key in st:                                                           # finalize wrote the same numbers
        for s in ('mean', 'std', 'min', 'max'): np.testing.assert_allclose(ds.stats[key][s], st[key][s], rtol=1e-12)


def test_compute_stats_of_a_constant_feature_is_exact(tmp_path):
    w = EpisodeWriter(tmp_path/'c', fps=10)
    w.add_episode(0, {IMAGE: np.full((4, 8, 8, 3), 51, np.uint8), PROPRIO: np.full((4, 15), 0.1, np.float32),
                      ACTION: np.zeros((4, 7), np.float32)}, 'find the book')
    st = compute_stats(w.finalize())
    np.testing.assert_allclose(st[IMAGE]['mean'], [0.2] * 3) and np.testing.assert_array_equal(st[IMAGE]['std'], 0)
    assert (st[PROPRIO]['std'] == 0).all() and (st[ACTION]['std'] == 0).all()   # no negative variance from rounding


def test_array_normalizer_equals_normalizer(tmp_path):
    ds, eps = _hand_dataset(tmp_path/'d', wrist=True)
    stats = {**ds.stats, ACTION: {**ds.stats[ACTION], 'std': np.r_[ds.stats[ACTION]['std'][:6], 0.0]}}   # a constant dimension
    tn, an = Normalizer(stats), ArrayNormalizer(stats)
    assert tn.keys == an.keys == (IMAGE, PROPRIO, ACTION, WRIST_IMAGE) and WRIST_IMAGE in an and 'other' not in an
    g = np.random.default_rng(0)
    for key, shape in ((IMAGE, (2, 3, 8, 8)), (WRIST_IMAGE, (2, 3, 4, 4)), (PROPRIO, (5, 15)), (ACTION, (2, 8, 7))):
        x = g.normal(size=shape).astype(np.float32)
        a, t = an.normalize(key, x), tn.normalize(key, torch.from_numpy(x)).numpy()
        assert a.dtype == np.float32 and a.shape == shape
        np.testing.assert_allclose(a, t, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(an.unnormalize(key, a), tn.unnormalize(key, torch.from_numpy(t)).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(an.unnormalize(key, a), x, rtol=1e-5, atol=1e-5)
    x = g.normal(size=(3, 7)).astype(np.float32)                            # std 0 is floored at STD_EPS, not divided by
    np.testing.assert_allclose(an.normalize(ACTION, x)[:, 6], (x[:, 6] - stats[ACTION]['mean'][6]) / STD_EPS, rtol=1e-5)
    m = stats[IMAGE]['mean']; img = np.ones((1, 3, 8, 8), np.float32) * np.asarray(m, np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(an.normalize(IMAGE, img), 0, atol=1e-6)     # per channel, channels first
    back = ArrayNormalizer(tn.stats())                                     # the saved form rebuilds the same normalizer
    for key in an.keys: np.testing.assert_allclose(back.std[key], an.std[key], rtol=1e-6)
    assert Normalizer(stats, (PROPRIO,)).keys == (PROPRIO,)
    no_wrist = {k: v for k, v in stats.items() if k != WRIST_IMAGE}
    assert ArrayNormalizer(no_wrist).keys == Normalizer(no_wrist).keys == (IMAGE, PROPRIO, ACTION)   # the default keys follow the data
    for cls in (Normalizer, ArrayNormalizer):
        with pytest.raises(ValueError, match=r"statistics lack \['wrist_image'\]"): cls(no_wrist, (IMAGE, WRIST_IMAGE))


# ---- the episode format through the writer ----

def test_writer_records_features_from_the_encoded_bytes(tmp_path):
    ds, eps = _hand_dataset(tmp_path/'d', (3, 4))
    f = ds.info['features']
    assert f[IMAGE] == {'dtype': 'uint8', 'shape': [8, 8, 3]} and f[PROPRIO] == {'dtype': 'float32', 'shape': [15]}
    assert f[SUCCESS] == {'dtype': 'bool', 'shape': []} and f[TIMESTAMP] == {'dtype': 'float64', 'shape': []}
    assert [e['length'] for e in ds.episodes] == [3, 4] and ds.num_frames == 7 and ds.starts.tolist() == [0, 3]
    data = encode_episode(eps[1])                                          # what a recording worker sends
    w = EpisodeWriter(tmp_path/'b', fps=10); w.add_episode(0, data, 'find the book')
    assert (tmp_path/'b'/w.index[0]['file']).read_bytes() == data and w.index[0]['nbytes'] == len(data)
    import hashlib; assert w.index[0]['sha256'] == hashlib.sha256(data).hexdigest() and w.index[0]['length'] == 4
    for k, v in EpisodeWriter(tmp_path/'b', fps=10).finalize().load_episode(0).items():
        np.testing.assert_array_equal(v, eps[1][k]); assert v.dtype == eps[1][k].dtype
    with pytest.raises(ValueError, match='already in'): w.add_episode(0, data, 'find the book')
    with pytest.raises(ValueError, match=r"features .* do not match"):
        w.add_episode(1, {**eps[0], PROPRIO: eps[0][PROPRIO][:, :14]}, 'find the book')
    import io; buf = io.BytesIO(); np.savez(buf, image=eps[0][IMAGE], action=eps[1][ACTION])   # bytes with unequal lengths
    with pytest.raises(ValueError, match=r'different lengths: \[3, 4\]'): w.add_episode(2, buf.getvalue(), 'find the book')
    with pytest.raises(ValueError, match='fps=10, writer was given fps=5'): EpisodeWriter(tmp_path/'b', fps=5)


@pytest.mark.parametrize('change,msg', [
    (lambda f: {**f, ACTION: np.where(np.arange(7) == 2, np.nan, f[ACTION])}, 'action has non-finite'),
    (lambda f: {**f, PROPRIO: np.full_like(f[PROPRIO], np.inf)}, 'proprio has non-finite'),
    (lambda f: {**f, 'depth': f[ACTION]}, r"unknown frame feature\(s\) \['depth'\]"),
    (lambda f: {k: v[:0] for k, v in f.items()}, 'no frames'),
    (lambda f: {**f, IMAGE: f[IMAGE][..., 0]}, r'uint8 \(T, H, W, 3\)'),
    (lambda f: {k: v for k, v in f.items() if k != PROPRIO}, "required feature 'proprio'"),
    (lambda f: [], 'non-empty dict')])
def test_encode_episode_refuses_bad_frames(change, msg):
    g = np.random.default_rng(0)
    ok = {IMAGE: g.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), PROPRIO: np.zeros((3, 15), np.float32),
          ACTION: np.zeros((3, 7), np.float32)}
    with pytest.raises(ValueError, match=msg): encode_episode(change(ok))


# ---- the memory-mapped frames ----

def test_frames_cache_is_built_once_shared_and_matches_the_episodes(tmp_path):
    ds, eps = _hand_dataset(tmp_path/'d', (3, 5, 2))
    fr = ds.frames()
    assert set(fr) == {IMAGE, PROPRIO, ACTION, SUCCESS, TIMESTAMP}
    for k in fr: np.testing.assert_array_equal(fr[k], np.concatenate([e[k] for e in eps]))   # back to back, in index order
    caches = list((tmp_path/'d'/'cache').iterdir())
    assert len(caches) == 1 and caches[0].name.startswith('frames-')
    stamp = {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()}
    assert ds.frames() is fr                                               # once per dataset object
    other = EpisodeDataset(tmp_path/'d').frames()                          # another reader maps the same files
    assert {p.name: p.stat().st_mtime_ns for p in caches[0].iterdir()} == stamp
    assert all(isinstance(v, np.memmap) and Path(v.filename).parent == caches[0] for v in other.values())
    with pytest.raises(ValueError, match='read-only'): other[ACTION][0, 0] = 1.0
    alt = EpisodeDataset(tmp_path/'d', cache_dir=tmp_path/'elsewhere').frames()
    assert Path(alt[IMAGE].filename).parent.parent == tmp_path/'elsewhere'


def test_frames_cache_is_invalidated_when_episodes_change(tmp_path):
    ds, eps = _hand_dataset(tmp_path/'d', (3, 5))
    n0 = len(ds.frames()[ACTION])
    w = EpisodeWriter(tmp_path/'d', fps=10)
    w.add_episode(7, {IMAGE: np.full((4, 8, 8, 3), 9, np.uint8), PROPRIO: np.zeros((4, 15), np.float32),
                      ACTION: np.ones((4, 7), np.float32), SUCCESS: np.zeros(4, bool), TIMESTAMP: np.arange(4) / 10}, 'find the book')
    fr = w.finalize().frames()
    assert n0 == 8 and len(fr[ACTION]) == 12 and (fr[ACTION][8:] == 1).all() and (fr[IMAGE][8:] == 9).all()
    assert len(list((tmp_path/'d'/'cache').glob('frames-*'))) == 2          # a new cache under a new tag; the old one untouched


def test_frames_cache_build_is_atomic(tmp_path):
    ds, _ = _hand_dataset(tmp_path/'d', (3, 5, 2))
    real, calls = ds.load_episode, []
    def crash(k, verify=False):
        calls.append(k)
        if k == 1: raise OSError('disk full')
        return real(k, verify)
    ds.load_episode = crash
    with pytest.raises(OSError, match='disk full'): ds.frames()
    assert calls == [0, 1]
    assert list((tmp_path/'d'/'cache').iterdir()) == []                    # no partial cache, no temporary directory
    ds.load_episode = real
    assert len(ds.frames()[ACTION]) == 10                                  # the same reader retries and builds it whole
    assert [p.name[:7] for p in (tmp_path/'d'/'cache').iterdir()] == ['frames-']


# ---- the training view: chunks, augmentation ----

def test_cut_chunks_pads_past_each_episode_end(tmp_path):
    actions = np.arange(10, dtype=np.float32)[:, None] * [1, -1]          # (10, 2): row r holds (r, -r)
    ends = np.array([4, 4, 10, 10]); rows = np.array([0, 2, 8, 9])         # episodes [0, 4) and [4, 10)
    chunks, pad = cut_chunks(actions, ends, rows, 3)
    assert chunks.shape == (4, 3, 2) and pad.dtype == bool
    assert chunks[:, :, 0].tolist() == [[0, 1, 2], [2, 3, 3], [8, 9, 9], [9, 9, 9]]   # the last action repeats under the mask
    assert pad.tolist() == [[False] * 3, [False, False, True], [False, False, True], [False, True, True]]
    np.testing.assert_array_equal(chunks[..., 1], -chunks[..., 0])
    c1, p1 = cut_chunks(actions, ends, rows, 1)                            # H = 1: the frame's own action, never padded
    assert c1[:, 0, 0].tolist() == [0, 2, 8, 9] and not p1.any()
    mm = np.lib.format.open_memmap(str(tmp_path/'a.npy'), 'w+', np.float32, (10, 2))
    mm[:] = actions
    np.testing.assert_array_equal(cut_chunks(mm, ends, rows, 3)[0], chunks)   # memory-mapped actions give plain arrays


def _coords(B, S=16):
    "Images (B, 3, S, S) whose channels encode the row, the column and a constant: an augmentation can be read back."
    r, c = torch.meshgrid(torch.arange(S), torch.arange(S), indexing='ij')
    img = torch.stack([0.35 + 0.3 * r / (S - 1), 0.35 + 0.3 * c / (S - 1), torch.full((S, S), 0.5)])
    return img.expand(B, 3, S, S).clone()


def _read_back(out, S=16):
    "Per image: the contrast factor, the brightness offset and the (row, column) shift of an augmented `_coords` image."
    a = (out[:, 1, 8, 9] - out[:, 1, 8, 8]) / (0.3 / (S - 1))              # jitter is affine: a x + e, the same for each channel
    e = out[:, 2, 8, 8] - a * 0.5                                          # the constant channel gives e
    rows = ((out[:, 0, 8, 8] - e) / a - 0.35) / 0.3 * (S - 1) - 8
    cols = ((out[:, 1, 8, 8] - e) / a - 0.35) / 0.3 * (S - 1) - 8
    return a, e, rows, cols


def test_augment_images_shift_and_jitter_bounds():
    x = _coords(256)
    out = augment_images(x, torch.Generator().manual_seed(0), pad=3)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= float(out.min()) and float(out.max()) <= 1
    a, e, rows, cols = _read_back(out)
    torch.testing.assert_close(rows, rows.round(), atol=1e-3, rtol=0)     # whole-pixel shifts ...
    assert set(rows.round().int().tolist()) == set(cols.round().int().tolist()) == set(range(-3, 4))   # ... of -pad..pad
    assert 0.8 - 1e-4 <= float(a.min()) and float(a.max()) <= 1.2 + 1e-4   # contrast within +-20 %
    m = x.mean((1, 2, 3))                                                   # brightness: e = m (1 - a) + b, |b| <= 0.2
    b = e - m * (1 - a)
    assert float(b.abs().max()) <= 0.2 + 0.02 and float(b.std()) > 0.05     # (m of the shifted crop differs a little)
    const = torch.full((4, 3, 16, 16), 0.5)                                 # a flat image stays flat: shifts add no edges
    o = augment_images(const, torch.Generator().manual_seed(1))
    assert float((o - o[:, :1, :1, :1]).abs().max()) < 1e-6 and float((o[:, 0, 0, 0] - 0.5).abs().max()) <= 0.2 + 1e-6


def test_augment_images_is_seeded_and_per_sample():
    x = _coords(8)
    a1 = augment_images(x, torch.Generator().manual_seed(5))
    assert torch.equal(a1, augment_images(x, torch.Generator().manual_seed(5)))   # the generator decides everything
    assert not torch.equal(a1, augment_images(x, torch.Generator().manual_seed(6)))
    torch.manual_seed(0); g = torch.Generator().manual_seed(5)
    torch.rand(100)                                                        # the global stream is not used
    assert torch.equal(a1, augment_images(x, g))
    _, _, rows, cols = _read_back(a1)
    assert len(set(zip(rows.round().tolist(), cols.round().tolist()))) > 4  # each image of the batch gets its own shift
    y = x.clone(); y[3] = torch.rand(3, 16, 16)                             # another image in one slot changes only that slot
    a2 = augment_images(y, torch.Generator().manual_seed(5))
    same = [k for k in range(8) if k != 3]
    torch.testing.assert_close(a2[same], a1[same])
    assert (a2[3] - a1[3]).abs().max() > 0.01
    assert torch.equal(x, _coords(8))                                      # the input is not modified in place


# ---- the one observation check ----

def _obs1(S=20, seed=0):
    g = np.random.default_rng(seed)
    return dict(image=g.integers(0, 256, (S, S, 3), dtype=np.uint8), proprio=g.normal(size=15).astype(np.float32),
                command='Pick up the red cup.')


def test_check_observation_returns_checked_arrays():
    import cv2
    tok, o = CommandTokenizer.build(command_corpus()), _obs1(S=20)
    c = check_observation(o, 16, 15, tok)
    assert c['single'] is True and c['image'].shape == (1, 16, 16, 3) and c['image'].dtype == np.uint8
    np.testing.assert_array_equal(c['image'][0], cv2.resize(o['image'], (16, 16), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(c['proprio'], o['proprio'][None])
    np.testing.assert_array_equal(c['token_ids'], tok.encode(o['command'])[0][None])
    assert c['wrist_image'] is None and c['token_ids'].dtype == np.int64
    same = check_observation({**o, 'image': o['image'][:16, :16]}, 16, 15, tok)
    np.testing.assert_array_equal(same['image'][0], o['image'][:16, :16])   # the right size is passed through untouched
    lst = check_observation({**o, 'proprio': o['proprio'].tolist()}, 16, 15, tok)   # any sequence of 15 numbers
    assert lst['proprio'].dtype == np.float32 and np.allclose(lst['proprio'], o['proprio'])
    b = check_observation({'image': np.stack([o['image']] * 2), 'proprio': np.stack([o['proprio']] * 2),
                           'command': ['find the book', 'navigate to the office']}, 16, 15, tok)
    assert b['single'] is False and b['image'].shape == (2, 16, 16, 3) and b['proprio'].shape == (2, 15)
    np.testing.assert_array_equal(b['token_ids'][1], tok.encode('navigate to the office')[0])
    w = check_observation({**o, 'wrist_image': o['image']}, 16, 15, tok, wrist_size=8)
    np.testing.assert_array_equal(w['wrist_image'][0], cv2.resize(o['image'], (8, 8), interpolation=cv2.INTER_AREA))
    u = check_observation({**o, 'command': 'pick up the xyzzy cup'}, 16, 15, tok, allow_unknown=True)
    assert (u['token_ids'] == tok.unk_id).sum() == 1


@pytest.mark.parametrize('change,msg,kw', [
    (lambda o: [o], r"obs must be a dict with 'image', 'proprio' and 'command', got list", {}),
    (lambda o: {'image': o['image']}, r"obs lacks \['proprio', 'command'\]$", {}),
    (lambda o: o, r"obs lacks \['wrist_image'\]: this policy reads a 8-pixel wrist camera", dict(wrist_size=8)),
    (lambda o: {**o, 'wrist_image': o['image']}, r"has a 'wrist_image' but this policy reads no wrist camera", {}),
    (lambda o: {**o, 'image': o['image'].astype(np.float32)}, 'image must be uint8 RGB pixels .* got dtype float32', {}),
    (lambda o: {**o, 'image': o['image'].tolist()}, 'image must be uint8 RGB pixels .* got dtype int64', {}),
    (lambda o: {**o, 'image': o['image'][..., :2]}, r'with 3 RGB channels, got \(20, 20, 2\)', {}),
    (lambda o: {**o, 'image': o['image'][None, None]}, r'with 3 RGB channels, got \(1, 1, 20, 20, 3\)', {}),
    (lambda o: {**o, 'image': o['image'][:7]}, r'image is too small to resize: \(7, 20, 3\)', {}),
    (lambda o: {**o, 'wrist_image': o['image'][:, :5]}, r'wrist_image is too small', dict(wrist_size=8)),
    (lambda o: {**o, 'proprio': o['proprio'][:14]}, r'proprio must have shape \(15,\), got \(14,\)$', {}),
    (lambda o: {**o, 'proprio': np.zeros((2, 15))}, r'proprio must have shape \(15,\), got \(2, 15\)', {}),
    (lambda o: {**o, 'proprio': None}, 'proprio must have shape', {}),
    (lambda o: {**o, 'proprio': 'fifteen'}, 'proprio must be 15 numbers, got str', {}),
    (lambda o: {**o, 'proprio': np.where(np.arange(15) % 7 == 1, np.nan, o['proprio'])}, r'NaN at indices \[1, 8\]', {}),
    (lambda o: {**o, 'proprio': np.where(np.arange(15) == 0, -np.inf, o['proprio'])}, 'proprio contains inf', {}),
    (lambda o: {**o, 'command': 'find the xyzzy'}, r"unknown word\(s\) \['xyzzy'\]", {}),
    (lambda o: {**o, 'command': None}, 'command must be a str, got NoneType', {}),
    (lambda o: {**o, 'image': np.stack([o['image']] * 2)}, 'a batch of 2 images needs a list of 2 commands, got str', {}),
    (lambda o: {**o, 'image': np.stack([o['image']] * 2), 'command': ['find the book']}, 'needs a list of 2 commands, got list', {}),
    (lambda o: {**o, 'image': np.stack([o['image']] * 2), 'command': ['find the book'] * 2},
     r'proprio must have shape \(15,\) or \(2, 15\), got \(15,\)', {}),
    (lambda o: {'image': np.stack([o['image']] * 2), 'proprio': np.zeros((2, 15)), 'command': ['find the book'] * 2,
                'wrist_image': o['image']}, 'batch sizes differ: image 2, wrist_image 1', dict(wrist_size=8))])
def test_check_observation_names_every_problem(change, msg, kw):
    tok = CommandTokenizer.build(command_corpus())
    with pytest.raises(ValueError, match=msg): check_observation(change(_obs1()), 16, 15, tok, **kw)


def test_object_targets_mask_the_commanded_object_once_grasped():
    scene = {'objects': [{'name': 'red cup', 'xy': [0.55, 0.15, 0.0]}, {'name': 'book', 'xy': [0.7, -0.15]}]}
    acts = np.zeros((5, 7), np.float32); acts[2:, 6] = 1.0                # the gripper closes at frame 2
    xy, mask = object_targets({'meta': {'scene': scene}, 'task': {'obj': 'red cup'}}, acts)
    cup, book = OBJECT_NAMES.index('red cup'), OBJECT_NAMES.index('book')
    assert xy.shape == (5, len(OBJECT_NAMES), 2) and mask.shape == (5, len(OBJECT_NAMES))
    np.testing.assert_allclose(xy[:, cup], [[0.0, 1.0]] * 5, atol=1e-6)    # (xy - (0.55, 0)) / 0.15 at every frame
    np.testing.assert_allclose(xy[:, book], [[1.0, -1.0]] * 5, atol=1e-6)
    assert mask[:, cup].tolist() == [True, True, False, False, False]      # the held object's start position no longer holds
    assert mask[:, book].all() and mask.sum(1).tolist() == [2, 2, 1, 1, 1]  # absent objects are never targets
    _, m = object_targets({'meta': {'scene': scene}, 'task': {'obj': None, 'family': 'move'}}, acts)
    assert m[:, cup].all()                                                  # no commanded object: nothing is masked
    _, m = object_targets({'meta': {'scene': scene}, 'task': {'obj': 'red cup'}}, np.zeros((3, 7), np.float32))
    assert m[:, cup].all()                                                  # never closed: never grasped
    xy0, m0 = object_targets({'meta': {}, 'task': None}, acts)              # an episode without a recorded scene
    assert not m0.any() and not xy0.any()
    with pytest.raises(ValueError): object_targets({'meta': {'scene': {'objects': [{'name': 'teapot', 'xy': [0, 0]}]}}}, acts)
def test_stats_are_exact_over_every_frame(small):
    "Image statistics (counted by histogram) equal the float computation over every pixel; vectors per dimension."
    ds = EpisodeDataset(small)
    eps = [ds.load_episode(k) for k in range(len(ds))]
    st = compute_stats(ds)
    img = np.concatenate([e[IMAGE].reshape(-1, 3) for e in eps]).astype(np.float64) / 255
    prop = np.concatenate([e[PROPRIO] for e in eps]).astype(np.float64)
    for s, x in ((st[IMAGE], img), (st[PROPRIO], prop)):
        np.testing.assert_allclose(s['mean'], x.mean(0), rtol=0, atol=1e-10)
        np.testing.assert_allclose(s['std'], x.std(0), rtol=0, atol=1e-9)
        np.testing.assert_array_equal(s['min'], x.min(0)); np.testing.assert_array_equal(s['max'], x.max(0))
        assert s['count'][0] == len(x)


def test_scaling_ratio_only_where_startup_is_small():
    "The 2-vs-1-worker ratio is reported (median of the repeats) only when worker start-up is < 10% of the run."
    def runs(startup):
        t1 = dict(startup_s=0.0, finalize_s=0.1, workers=[dict(busy_fraction=0.95, cpu_per_busy_s=1.0)])
        t2 = dict(startup_s=startup, finalize_s=0.1, workers=[dict(busy_fraction=0.9, cpu_per_busy_s=0.9)] * 2)
        return [dict(workers=1, seconds=40.0, frames_per_s=f1, timing=t1) for f1 in (100.0, 110.0, 90.0)] + \
               [dict(workers=2, seconds=20.0, frames_per_s=f2, timing=t2) for f2 in (180.0, 170.0, 200.0)]
    ok = dict(runs=runs(1.0)); _data_scaling(ok, 0.1)
    assert ok['scaling_2_vs_1_workers'] == 1.8 and ok['scaling_2_vs_1_workers_runs'] == [1.8, 1.545, 2.222]
    assert ok['startup_fraction_2_workers'] == 0.05 and ok['frames_per_s_2_workers'] == 180.0
    bad = dict(runs=runs(2.5)); _data_scaling(bad, 0.1)
    assert bad['scaling_2_vs_1_workers'] is None and '12%' in bad['scaling_not_reported']
    assert 'scaling_2_vs_1_workers_runs' not in bad
