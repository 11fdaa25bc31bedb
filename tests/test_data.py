"Contracts of the data chapter (vla_nb.data): resumable deterministic generation, episode-atomic format, validation, training view."
import json, os, signal, subprocess, sys, time
import numpy as np
import pytest
import torch
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import (SyntheticDataGenerator, DataConfig, EpisodeDataset, EpisodeWriter, ChunkDataset,
                         validate_dataset, plan_episodes, split_episodes, compute_stats, IMAGE, PROPRIO, ACTION, ACTION_PAD, TOKENS)
from vla_nb.data import _data_scaling


def _arrays(root):
    ds = EpisodeDataset(root)
    return {e['episode_index']: ds.load_episode(k) for k, e in enumerate(ds.episodes)}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')/'small'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=8, seed=3)).generate_dataset(progress_bar=False)
    return root


def test_generated_dataset_is_valid_and_balanced(small):
    assert validate_dataset(small) == []
    ds = EpisodeDataset(small)
    assert len(ds) + len(ds.failures) == 8
    assert {e['task']['family'] for e in ds.episodes} == {'pick', 'move', 'find', 'place'}
    assert all(np.abs(ds.load_episode(k)[ACTION]).max() <= 1 for k in range(len(ds)))
    assert all(ds.load_episode(k)['success'][-1] for k in range(len(ds)))    # only successful episodes are stored


def test_same_dataset_for_one_or_two_workers(small, tmp_path):
    rep = SyntheticDataGenerator(DataConfig(root=str(tmp_path/'w2'), num_episodes=8, seed=3, workers=2)).generate_dataset(progress_bar=False)
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
    code = f"from vla_nb.data import *; SyntheticDataGenerator(DataConfig(root={str(root)!r}, num_episodes=8, seed=3)).generate_dataset(progress_bar=False)"
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index, t0 = root/'meta/episodes.jsonl', time.time()
    while time.time() - t0 < 120 and not (index.exists() and index.read_bytes().count(b'\n') >= 3): time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    n_before = index.read_bytes().count(b'\n')
    assert 3 <= n_before < 8, n_before
    assert len(EpisodeDataset(root)) == n_before          # a reader sees the complete episodes only
    failed_before = len(EpisodeDataset(root).failures)
    rep = SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=8, seed=3)).generate_dataset(progress_bar=False)
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
    assert s[IMAGE].shape == (3, 96, 96) and s[ACTION].shape == (6, 7) and s[TOKENS].dtype == torch.int64
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
