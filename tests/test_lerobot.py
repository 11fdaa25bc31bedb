"Contracts of the LeRobot interop chapter (vla_nb.lerobot): v3.0 export/import round trip, layout checks, clear errors."
import importlib.util
import json
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla_nb.data import ACTION, IMAGE, PROPRIO, SUCCESS, TIMESTAMP, WRIST_IMAGE, EpisodeDataset, EpisodeWriter
from vla_nb.lerobot import (CODEBASE_VERSION, DATA_PATH, EPISODES_PATH, INFO_PATH, QUANTILE_BINS, QUANTILES, SIDECAR_PATH,
                            STATS_PATH, TASKS_PATH, VIDEO_PATH, VideoEncoderConfig, VideoReader, aggregate_stats,
                            check_lerobot_layout, decode_image, encode_image, export_lerobot, feature_stats, import_lerobot,
                            quantile_stats, read_tasks, tasks_table)
from make_lerobot_video import write_dataset as write_lerobot_video_dataset

EPISODES = [(0, 'pick up the book', 4), (2, 'find the red cup', 6), (5, 'pick up the book', 3)]


def frames(T, seed, wrist=False):
    g = np.random.default_rng(seed)
    f = {IMAGE: g.integers(0, 256, (T, 10, 12, 3), dtype=np.uint8), PROPRIO: g.normal(size=(T, 15)).astype(np.float32),
         ACTION: g.uniform(-1, 1, (T, 7)).astype(np.float32), SUCCESS: np.arange(T) == T - 1, TIMESTAMP: np.arange(T) / 10}
    if wrist: f[WRIST_IMAGE] = g.integers(0, 256, (T, 10, 12, 3), dtype=np.uint8)
    return f


def make_dataset(root, wrist=False):
    w = EpisodeWriter(root, fps=10, config={'note': 'test'})
    for i, cmd, T in EPISODES:
        w.add_episode(i, frames(T, i, wrist), cmd, {'family': cmd.split()[0], 'obj': cmd.split('the ')[-1], 'loc': None}, {'seed': i})
    return w.finalize()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp('lerobot')
    ds = make_dataset(base / 'ours')
    return ds, export_lerobot(ds, base / 'lrds')


def copy_of(out, tmp_path, name='copy'):
    return shutil.copytree(out, tmp_path / name)


def edit_info(root, fn):
    p = root / INFO_PATH
    info = json.loads(p.read_text())
    fn(info)
    p.write_text(json.dumps(info))
    return root


# ---- export: the layout ----

def test_export_layout(exported):
    ds, out = exported
    files = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
    assert files == sorted(['data/chunk-000/file-000.parquet', 'meta/episodes/chunk-000/file-000.parquet', INFO_PATH,
                            STATS_PATH, SIDECAR_PATH, TASKS_PATH])
    info = json.loads((out / INFO_PATH).read_text())
    assert info['codebase_version'] == CODEBASE_VERSION == 'v3.0'
    assert (info['total_episodes'], info['total_frames'], info['total_tasks']) == (3, 13, 2)
    assert info['splits'] == {'train': '0:3'} and info['video_path'] is None and info['fps'] == 10
    f = info['features']
    assert f['observation.image'] == {'dtype': 'image', 'shape': [10, 12, 3], 'names': ['height', 'width', 'channels']}
    assert f['observation.state']['shape'] == [15] and len(f['observation.state']['names']) == 15
    assert f['action']['names'] == ['dx', 'dy', 'dz', 'droll', 'dpitch', 'dyaw', 'gripper']
    assert f['timestamp']['dtype'] == 'float32' and f['index']['dtype'] == 'int64'
    assert read_tasks(out / TASKS_PATH) == ['pick up the book', 'find the red cup']
    eps = pq.read_table(out / EPISODES_PATH.format(chunk_index=0, file_index=0)).to_pydict()
    assert eps['episode_index'] == [0, 1, 2] and eps['length'] == [4, 6, 3]
    assert eps['dataset_from_index'] == [0, 4, 10] and eps['dataset_to_index'] == [4, 10, 13]
    assert np.shape(eps['stats/observation.image/mean'][0]) == (3, 1, 1)
    stats = json.loads((out / STATS_PATH).read_text())
    assert np.shape(stats['observation.image']['std']) == (3, 1, 1) and stats['action']['count'] == [13]
    assert check_lerobot_layout(out) == []


def test_data_columns(exported):
    ds, out = exported
    t = pq.read_table(out / DATA_PATH.format(chunk_index=0, file_index=0))
    assert t['index'].to_pylist() == list(range(13))
    assert t['frame_index'].to_pylist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert t['task_index'].to_pylist() == [0] * 4 + [1] * 6 + [0] * 3
    assert t.schema.field('observation.state').type == pa.list_(pa.float32(), 15)
    assert t.schema.field('observation.image').type == pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    assert b'huggingface' in t.schema.metadata
    assert t['next.success'].to_pylist()[:4] == [False, False, False, True]


def test_stats_match_our_stats(exported):
    ds, out = exported
    st = json.loads((out / STATS_PATH).read_text())
    np.testing.assert_allclose(st['observation.state']['mean'], ds.stats[PROPRIO]['mean'], atol=1e-5)
    np.testing.assert_allclose(st['action']['std'], ds.stats[ACTION]['std'], atol=1e-5)
    np.testing.assert_allclose(np.ravel(st['observation.image']['mean']), ds.stats[IMAGE]['mean'], atol=1e-6)


# ---- round trip ----

def test_round_trip(exported, tmp_path):
    ds, out = exported
    back = import_lerobot(out, tmp_path / 'back')
    assert isinstance(back, EpisodeDataset) and len(back) == 3
    assert [(e['episode_index'], e['command'], e['task'], e['meta']) for e in back.episodes] == \
           [(e['episode_index'], e['command'], e['task'], e['meta']) for e in ds.episodes]
    for k in range(len(ds)):
        a, b = ds.load_episode(k), back.load_episode(k)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            np.testing.assert_array_equal(b[key], a[key])      # images exact: PNG is lossless
    for key in (IMAGE, PROPRIO, ACTION):
        np.testing.assert_allclose(back.stats[key]['mean'], ds.stats[key]['mean'], atol=1e-6)
    assert back.tokenizer.to_json() == ds.tokenizer.to_json()


def test_round_trip_many_files_and_wrist(tmp_path):
    ds = make_dataset(tmp_path / 'ours', wrist=True)
    out = export_lerobot(ds.root, tmp_path / 'lrds', data_files_size_in_mb=1e-4)
    assert sorted(p.name for p in (out / 'data/chunk-000').iterdir()) == ['file-000.parquet', 'file-001.parquet', 'file-002.parquet']
    assert 'observation.images.wrist' in json.loads((out / INFO_PATH).read_text())['features']
    assert check_lerobot_layout(out) == []
    back = import_lerobot(out, tmp_path / 'back')
    np.testing.assert_array_equal(back.load_episode(1)[WRIST_IMAGE], ds.load_episode(1)[WRIST_IMAGE])
    np.testing.assert_array_equal(back.load_episode(2)[IMAGE], ds.load_episode(2)[IMAGE])


def test_import_without_sidecar(exported, tmp_path):
    ds, out = exported
    plain = copy_of(out, tmp_path)
    (plain / SIDECAR_PATH).unlink()
    back = import_lerobot(plain, tmp_path / 'back')
    assert [e['episode_index'] for e in back.episodes] == [0, 1, 2]
    assert back.episodes[1]['meta'] == {'lerobot': {'episode_index': 1, 'tasks': ['find the red cup']}}
    np.testing.assert_array_equal(back.load_episode(1)[ACTION], ds.load_episode(1)[ACTION])


def test_jpeg_export_is_valid_and_close(tmp_path):
    ds = make_smooth_dataset(tmp_path / 'ours')                           # camera-like frames: JPEG's error is small
    out = export_lerobot(ds, tmp_path / 'lrds', image_format='jpeg')
    assert check_lerobot_layout(out) == []
    back = import_lerobot(out, tmp_path / 'back')
    for k in range(len(ds)):
        a, b = ds.load_episode(k)[IMAGE], back.load_episode(k)[IMAGE]
        np.testing.assert_array_equal(b, [decode_image(encode_image(im, 'jpeg')) for im in a])  # exactly the JPEG's pixels
        assert 0 < np.abs(b.astype(int) - a).mean() < 4                     # lossy, yet close to the original
        np.testing.assert_array_equal(back.load_episode(k)[ACTION], ds.load_episode(k)[ACTION])


# ---- atomic export ----

def test_export_refuses_to_overwrite(exported, tmp_path):
    ds, out = exported
    with pytest.raises(FileExistsError, match='overwrite=True'):
        export_lerobot(ds, out)
    target = tmp_path / 'again'
    target.mkdir()
    (target / 'stale.txt').write_text('x')
    export_lerobot(ds, target, overwrite=True)
    assert not (target / 'stale.txt').exists() and check_lerobot_layout(target) == []
    assert [p.name for p in tmp_path.iterdir()] == ['again']          # no temporary or old directories left


def test_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    ds, _ = exported
    import vla_nb.lerobot as L
    def boom(*a, **k): raise RuntimeError('disk full')
    monkeypatch.setattr(L, '_write_meta', boom)
    with pytest.raises(RuntimeError, match='disk full'):
        export_lerobot(ds, tmp_path / 'lrds')
    assert list(tmp_path.iterdir()) == []


# ---- clear errors on import ----

def test_missing_info(tmp_path):
    with pytest.raises(FileNotFoundError, match='meta/info.json is missing'):
        import_lerobot(tmp_path / 'nothing', tmp_path / 'x')


def test_corrupted_info_json(exported, tmp_path):
    bad = copy_of(exported[1], tmp_path)
    (bad / INFO_PATH).write_text('{"codebase_version": "v3.0", "feat')
    with pytest.raises(ValueError, match='corrupt'):
        import_lerobot(bad, tmp_path / 'x')
    assert any('not valid JSON' in p for p in check_lerobot_layout(bad))
    assert not (tmp_path / 'x').exists()


def test_wrong_codebase_version(exported, tmp_path):
    bad = edit_info(copy_of(exported[1], tmp_path), lambda i: i.update(codebase_version='v2.1'))
    with pytest.raises(ValueError, match=r"codebase_version 'v2.1' is not supported.*v3.0"):
        import_lerobot(bad, tmp_path / 'x')
    assert any("codebase_version is 'v2.1'" in p for p in check_lerobot_layout(bad))


def test_missing_required_feature(exported, tmp_path):
    bad = edit_info(copy_of(exported[1], tmp_path), lambda i: i['features'].pop('observation.state'))
    with pytest.raises(ValueError, match="missing required feature 'observation.state'"):
        import_lerobot(bad, tmp_path / 'x')


def test_shape_mismatch(exported, tmp_path):
    ds, out = exported
    with pytest.raises(ValueError, match='shape mismatch'):
        import_lerobot(out, tmp_path / 'x', expect={PROPRIO: [14]})
    bad = edit_info(copy_of(out, tmp_path), lambda i: i['features']['action'].update(shape=[6]))
    with pytest.raises(ValueError, match="shape mismatch: 'action'"):
        import_lerobot(bad, tmp_path / 'x')
    assert not (tmp_path / 'x').exists()


def test_video_camera_without_videos_is_explained(exported, tmp_path):
    def to_video(i): i['features']['observation.image']['dtype'] = 'video'
    bad = edit_info(copy_of(exported[1], tmp_path), to_video)
    with pytest.raises(ValueError, match=r"lacks \['videos/observation.image/chunk_index'"):
        import_lerobot(bad, tmp_path / 'x')
    assert any('video features need a video_path' in p for p in check_lerobot_layout(bad))
    assert not (tmp_path / 'x').exists()


# ---- check_lerobot_layout catches broken layouts ----

def test_check_catches_deleted_data_file(exported, tmp_path):
    bad = copy_of(exported[1], tmp_path)
    (bad / DATA_PATH.format(chunk_index=0, file_index=0)).unlink()
    probs = check_lerobot_layout(bad)
    assert any('missing data file data/chunk-000/file-000.parquet' in p for p in probs), probs


def test_check_catches_non_contiguous_index(exported, tmp_path):
    bad = copy_of(exported[1], tmp_path)
    f = bad / DATA_PATH.format(chunk_index=0, file_index=0)
    t = pq.read_table(f)
    i = t.schema.get_field_index('index')
    t = t.set_column(i, 'index', pa.array(np.r_[0:5, 6:14].astype(np.int64)))   # a gap at 5, same row count
    pq.write_table(t, f)
    probs = check_lerobot_layout(bad)
    assert any('`index` is not contiguous' in p for p in probs), probs


def test_check_catches_metadata_disagreements(exported, tmp_path):
    bad = edit_info(copy_of(exported[1], tmp_path), lambda i: i.update(total_frames=99))
    assert any('total_frames=99' in p for p in check_lerobot_layout(bad))
    bad = edit_info(copy_of(exported[1], tmp_path, 'c2'), lambda i: i['features']['action'].update(dtype='float64'))
    assert any("column 'action'" in p for p in check_lerobot_layout(bad))
    bad = copy_of(exported[1], tmp_path, 'c3')
    (bad / TASKS_PATH).unlink()
    assert any(p.startswith('tasks:') for p in check_lerobot_layout(bad))


# ---- statistics: LeRobot's histogram estimator ----

def test_quantiles_pinned_by_hand():
    s = quantile_stats(np.arange(4, dtype=np.float32)[:, None])   # 0, 1, 2, 3 in 5000 bins of width w = 3/5000
    w = 3 / QUANTILE_BINS
    np.testing.assert_allclose(s['q50'], [1667 * w], atol=1e-6)     # 1 is in bin 1666; 2 of 4 counts at its right edge
    np.testing.assert_allclose(s['q90'], [4999 * w + 0.6 * w], atol=1e-6)   # 3.6 counts: 60 % into the last bin
    np.testing.assert_allclose(s['q99'], [4999 * w + 0.96 * w], atol=1e-6)
    np.testing.assert_allclose([s['q01'], s['q10']], [[0], [0]], atol=1e-9)  # reached in the first bin: its left edge
    assert (s['mean'], s['min'], s['max'], s['count']) == ([1.5], [0], [3], [4])
    np.testing.assert_allclose(s['std'], [np.sqrt(1.25)], rtol=1e-6)
    one = quantile_stats(np.array([[5.0, -2.0]]))                       # one row: every quantile is the mean
    assert all(one[q].tolist() == [5.0, -2.0] for q in QUANTILES)
    img = feature_stats(np.array([[[[0, 10, 255]]], [[[255, 10, 0]]]], np.uint8), is_image=True)  # 2 frames of 1 px
    np.testing.assert_allclose(img['q50'].ravel(), [-1e-10 / 255, 10 / 255, -1e-10 / 255], atol=1e-9)
    np.testing.assert_allclose(img['q99'].ravel()[0], (4999 + 0.98) * 255 / 5000 / 255, atol=1e-6)
    assert img['count'].tolist() == [2] and img['mean'].shape == (3, 1, 1)


def test_image_stats_sample_frames_as_lerobot():
    g = np.random.default_rng(0)
    long = g.integers(0, 256, (150, 8, 8, 3), dtype=np.uint8)
    s = feature_stats(long, is_image=True)
    picked = long[np.round(np.linspace(0, 149, 100)).astype(int)]      # sample_indices: 100 of 150 frames
    assert s['count'].tolist() == [100]
    np.testing.assert_allclose(s['mean'].ravel(), picked.reshape(-1, 3).mean(0) / 255, rtol=1e-5)
    big = feature_stats(g.integers(0, 256, (2, 300, 310, 3), dtype=np.uint8), is_image=True)   # strided by 2
    assert big['count'].tolist() == [2]


def test_stats_file_is_what_recompute_stats_gives(exported):
    "Per-episode stats of the numeric columns as stored, aggregated: equal to stats.json (LeRobot's recompute_stats)."
    ds, out = exported
    t = pq.read_table(out / DATA_PATH.format(chunk_index=0, file_index=0))
    info = json.loads((out / INFO_PATH).read_text())
    keys = [k for k, ft in info['features'].items() if ft['dtype'] not in ('image', 'video', 'string')
            and k not in ('index', 'episode_index', 'task_index', 'frame_index', 'timestamp')]
    ep = t['episode_index'].to_numpy()
    column = lambda k: np.stack(t[k].to_numpy(zero_copy_only=False)) if pa.types.is_fixed_size_list(t[k].type) \
        else t[k].to_numpy()                                                # as pandas hands them to recompute_stats
    per_ep = [{k: feature_stats(column(k)[ep == e]) for k in keys} for e in range(3)]
    st = json.loads((out / STATS_PATH).read_text())
    for k, d in aggregate_stats(per_ep).items():
        for s_, v in d.items():
            np.testing.assert_array_equal(np.asarray(st[k][s_]), v, err_msg=f'{k}/{s_}')
    old = np.quantile(column('action')[ep == 1], 0.5, axis=0)
    assert not np.allclose(st['action']['q50'], old)                    # not numpy's linear quantile any more


# ---- video cameras ----

def smooth(T, size, shift):
    yy, xx = np.mgrid[:size, :size]
    ims = np.repeat(np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1).astype(np.uint8)[None], T, 0)
    for t in range(T):
        ims[t, 8:20, (2 * t + shift) % (size - 12):][:, :12] = (210, 60, 40)
    return ims


def make_smooth_dataset(root, size=32, wrist=False):
    w = EpisodeWriter(root, fps=10, config={'note': 'video'})
    for i, cmd, T in EPISODES:
        f = {**frames(T, i), IMAGE: smooth(T, size, 5 * i)}
        if wrist:
            f[WRIST_IMAGE] = smooth(T, size, 3 * i + 1)[:, ::-1].copy()
        w.add_episode(i, f, cmd, {'family': cmd.split()[0]}, {'seed': i})
    return w.finalize()


def all_frames(mp4):
    import av
    with av.open(str(mp4)) as c:
        return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


@pytest.fixture(scope='module')
def video_export(tmp_path_factory):
    base = tmp_path_factory.mktemp('lerobot_video')
    ds = make_smooth_dataset(base / 'ours', wrist=True)
    return ds, export_lerobot(ds, base / 'lrds', image_format='video')


def test_video_export_layout(video_export):
    ds, out = video_export
    assert check_lerobot_layout(out) == []
    files = sorted(str(p.relative_to(out)) for p in out.rglob('*.mp4'))
    assert files == [VIDEO_PATH.format(video_key=k, chunk_index=0, file_index=0)
                     for k in ('observation.image', 'observation.images.wrist')]
    info = json.loads((out / INFO_PATH).read_text())
    assert info['video_path'] == VIDEO_PATH and 'observation.image' not in pq.read_schema(out / DATA_PATH.format(
        chunk_index=0, file_index=0)).names
    ft = info['features']['observation.image']
    assert ft['dtype'] == 'video' and ft['shape'] == [32, 32, 3]
    assert {k: ft['info'][k] for k in ('video.codec', 'video.pix_fmt', 'video.fps', 'video.g', 'video.crf')} == \
           {'video.codec': 'av1', 'video.pix_fmt': 'yuv420p', 'video.fps': 10, 'video.g': 2, 'video.crf': 30}
    eps = pq.read_table(out / EPISODES_PATH.format(chunk_index=0, file_index=0)).to_pydict()
    np.testing.assert_allclose(eps['videos/observation.image/from_timestamp'], [0, 0.4, 1.0])
    np.testing.assert_allclose(eps['videos/observation.image/to_timestamp'], [0.4, 1.0, 1.3])
    assert np.shape(eps['stats/observation.image/q50'][0]) == (3, 1, 1)


def test_video_round_trip(video_export, tmp_path):
    ds, out = video_export
    back = import_lerobot(out, tmp_path / 'back')
    assert [(e['episode_index'], e['command'], e['task']) for e in back.episodes] == \
           [(e['episode_index'], e['command'], e['task']) for e in ds.episodes]
    for cam, name in ((IMAGE, 'observation.image'), (WRIST_IMAGE, 'observation.images.wrist')):
        decoded = all_frames(out / VIDEO_PATH.format(video_key=name, chunk_index=0, file_index=0))
        got = np.concatenate([back.load_episode(k)[cam] for k in range(3)])
        np.testing.assert_array_equal(got, decoded)                        # exactly PyAV's frames, in order
        want = np.concatenate([ds.load_episode(k)[cam] for k in range(3)])
        assert np.abs(got.astype(int) - want).mean() < 6                   # lossy but close
    for k in range(3):
        for key in (PROPRIO, ACTION, SUCCESS, TIMESTAMP):
            np.testing.assert_array_equal(back.load_episode(k)[key], ds.load_episode(k)[key])


def test_video_files_roll_over(tmp_path):
    ds = make_smooth_dataset(tmp_path / 'ours')
    out = export_lerobot(ds, tmp_path / 'lrds', image_format='video', video_files_size_in_mb=1e-6)
    assert sorted(p.name for p in (out / 'videos/observation.image/chunk-000').iterdir()) == \
           ['file-000.mp4', 'file-001.mp4', 'file-002.mp4']
    eps = pq.read_table(out / EPISODES_PATH.format(chunk_index=0, file_index=0)).to_pydict()
    assert eps['videos/observation.image/file_index'] == [0, 1, 2]
    assert eps['videos/observation.image/from_timestamp'] == [0.0, 0.0, 0.0]
    assert check_lerobot_layout(out) == []
    back = import_lerobot(out, tmp_path / 'back')
    np.testing.assert_array_equal(back.load_episode(2)[IMAGE], all_frames(out / 'videos/observation.image/chunk-000/file-002.mp4'))


def test_video_needs_a_size_the_encoder_takes(tmp_path):
    ds = make_dataset(tmp_path / 'ours')                                 # 10x12 frames: too narrow for SVT-AV1
    with pytest.raises(ValueError, match='libsvtav1 needs frames at least 32 px wide'):
        export_lerobot(ds, tmp_path / 'lrds', image_format='video')
    assert not (tmp_path / 'lrds').exists()
    out = export_lerobot(ds, tmp_path / 'lrds', image_format='video', video=VideoEncoderConfig(vcodec='h264'))
    assert check_lerobot_layout(out) == []
    info = json.loads((out / INFO_PATH).read_text())
    assert info['features']['observation.image']['info']['video.codec'] == 'h264'
    back = import_lerobot(out, tmp_path / 'back')
    np.testing.assert_array_equal(back.load_episode(0)[IMAGE], all_frames(out / VIDEO_PATH.format(
        video_key='observation.image', chunk_index=0, file_index=0))[:4])
    with pytest.raises(ValueError, match='pix_fmt'):
        VideoEncoderConfig(pix_fmt='rgb48')


def test_reader_matches_timestamps_within_tolerance(video_export):
    ds, out = video_export
    mp4 = out / VIDEO_PATH.format(video_key='observation.image', chunk_index=0, file_index=0)
    every = all_frames(mp4)
    rd = VideoReader(mp4)
    try:
        ks = [9, 2, 2, 12, 0, 5]                                           # out of order, repeated, backwards
        np.testing.assert_array_equal(rd.read(np.array(ks) / 10 + 4e-5), every[ks])   # off by less than 1e-4 s
        np.testing.assert_array_equal(rd.read([1.2, 1.0]), every[[12, 10]])
        with pytest.raises(ValueError, match='tolerance_s=0.0001'):
            rd.read([0.3002])
        with pytest.raises(ValueError, match='tolerance_s'):
            rd.read([5.0])                                                 # past the last frame
        np.testing.assert_array_equal(rd.read([0.4, 0.5]), every[[4, 5]])  # a failed read leaves no stale state
    finally:
        rd.close()
    assert np.array_equal(VideoReader(mp4, tolerance_s=0.05).read([0.349])[0], every[3])   # nearest frame


def test_check_catches_video_problems(video_export, tmp_path):
    bad = copy_of(video_export[1], tmp_path)
    (bad / VIDEO_PATH.format(video_key='observation.image', chunk_index=0, file_index=0)).unlink()
    assert 'missing video file videos/observation.image/chunk-000/file-000.mp4' in check_lerobot_layout(bad)
    with pytest.raises(FileNotFoundError, match='file-000.mp4 is missing'):
        import_lerobot(bad, tmp_path / 'x')
    bad2 = copy_of(video_export[1], tmp_path, 'c2')
    stray = bad2 / VIDEO_PATH.format(video_key='observation.image', chunk_index=0, file_index=7)
    shutil.copy(bad2 / VIDEO_PATH.format(video_key='observation.image', chunk_index=0, file_index=0), stray)
    assert 'video file videos/observation.image/chunk-000/file-007.mp4 is not referenced by any episode' in \
           check_lerobot_layout(bad2)


def test_lerobot_layout_video_dataset(tmp_path):
    "A dataset written in LeRobot's own way (tests/make_lerobot_video.py): per-episode mp4s joined by stream copy."
    expected = write_lerobot_video_dataset(tmp_path / 'lrds')
    assert check_lerobot_layout(tmp_path / 'lrds') == []
    back = import_lerobot(tmp_path / 'lrds', tmp_path / 'back')
    assert [e['command'] for e in back.episodes] == ['stack the red block', 'open the drawer', 'stack the red block']
    for cam, name in ((IMAGE, 'observation.images.front'), (WRIST_IMAGE, 'observation.images.wrist')):
        got = np.concatenate([back.load_episode(k)[cam] for k in range(len(back))])
        np.testing.assert_array_equal(got, expected[name])
    back2 = import_lerobot(tmp_path / 'lrds', tmp_path / 'back2', image_key='observation.images.wrist', wrist_key=None)
    np.testing.assert_array_equal(back2.load_episode(2)[IMAGE], expected['observation.images.wrist'][19:])


# ---- the sidecar cannot go stale ----

def rename_task(root, episode, task):
    "What LeRobot's modify_tasks(dataset, episode_tasks={episode: task}) does to the files."
    f = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    eps = pq.read_table(f)
    tasks = [task if e == episode else ts[0] for e, ts in zip(eps['episode_index'].to_pylist(), eps['tasks'].to_pylist())]
    uniq = sorted(set(tasks))
    pq.write_table(eps.set_column(eps.schema.get_field_index('tasks'), 'tasks', pa.array([[t] for t in tasks])), f)
    pq.write_table(tasks_table(uniq), root / TASKS_PATH)
    for p in (root / 'data').glob('*/*.parquet'):
        t = pq.read_table(p)
        ti = pa.array([uniq.index(tasks[e]) for e in t['episode_index'].to_pylist()], pa.int64())
        pq.write_table(t.set_column(t.schema.get_field_index('task_index'), 'task_index', ti), p)
    return edit_info(root, lambda i: i.update(total_tasks=len(uniq)))


def test_renamed_task_makes_its_entry_stale(exported, tmp_path):
    ds, out = exported
    ed = rename_task(copy_of(out, tmp_path), 0, 'grab the book')
    assert check_lerobot_layout(ed) == []
    with pytest.warns(UserWarning) as rec:
        back = import_lerobot(ed, tmp_path / 'back')
    msgs = [str(r.message) for r in rec]
    assert any("does not know ['grab']" in m and 'building a new tokenizer' in m for m in msgs), msgs
    assert any('1 of 3 episodes no longer match' in m and 'episodes [0]' in m for m in msgs), msgs
    e0 = back.episodes[0]
    assert (e0['episode_index'], e0['command'], e0['task']) == (0, 'grab the book', None)
    assert e0['meta'] == {'lerobot': {'episode_index': 0, 'tasks': ['grab the book']}}
    assert [(e['task'], e['meta']) for e in back.episodes[1:]] == [(e['task'], e['meta']) for e in ds.episodes[1:]]
    ids, _ = back.tokenizer.encode('grab the book')             # the new word has its own id
    assert back.tokenizer.decode(ids) == 'grab the book'
    with pytest.raises(ValueError, match=r"does not know \['grab'\].*unknown_words='rebuild'"):
        import_lerobot(ed, tmp_path / 'x', unknown_words='raise')
    assert not (tmp_path / 'x').exists()


def test_known_words_keep_the_tokenizer(exported, tmp_path):
    ds, out = exported
    ed = rename_task(copy_of(out, tmp_path), 1, 'pick up the red cup')     # new task, known words
    with pytest.warns(UserWarning, match='episodes \\[1\\]'):
        back = import_lerobot(ed, tmp_path / 'back')
    assert back.tokenizer.to_json() == ds.tokenizer.to_json()
    assert back.episodes[1]['task'] is None and back.episodes[0]['task'] == ds.episodes[0]['task']


def test_entries_follow_renumbered_episodes(exported, tmp_path):
    "Episode 1 gone and the rest renumbered (as delete_episodes does), with the full export's sidecar left in place."
    ds, out = exported
    part = export_lerobot(ds, tmp_path / 'part', episodes=[0, 2])
    shutil.copy(out / SIDECAR_PATH, part / SIDECAR_PATH)
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                      # every episode still matches: no warning
        back = import_lerobot(part, tmp_path / 'back')
    assert [(e['episode_index'], e['task']) for e in back.episodes] == [(0, ds.episodes[0]['task']), (5, ds.episodes[2]['task'])]


def test_changed_actions_or_old_sidecar_are_stale(exported, tmp_path):
    ds, out = exported
    ed = copy_of(out, tmp_path)
    f = ed / DATA_PATH.format(chunk_index=0, file_index=0)
    t = pq.read_table(f)
    a = np.stack(t['action'].to_numpy(zero_copy_only=False)).astype(np.float32)
    a[5, 0] += 0.5                                                          # episode 1, frame 1
    t = t.set_column(t.schema.get_field_index('action'), 'action', pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), 7))
    pq.write_table(t, f)
    with pytest.warns(UserWarning, match=r'1 of 3 .*episodes \[1\]'):
        back = import_lerobot(ed, tmp_path / 'back')
    assert back.episodes[1]['episode_index'] == 1 and back.episodes[1]['task'] is None
    old = copy_of(out, tmp_path, 'old')
    side = json.loads((old / SIDECAR_PATH).read_text())
    for e in side['episodes']:
        del e['command'], e['length'], e['action_sha256']                   # a sidecar from before version 2
    (old / SIDECAR_PATH).write_text(json.dumps(side))
    with pytest.warns(UserWarning, match='3 of 3 episodes'):
        back = import_lerobot(old, tmp_path / 'back_old')
    assert [e['episode_index'] for e in back.episodes] == [0, 1, 2]
    (old / SIDECAR_PATH).write_text('{"episodes": [')
    with pytest.raises(ValueError, match='vla_nb.json is corrupt'):
        import_lerobot(old, tmp_path / 'x')


# ---- choosing episodes ----

def test_export_some_episodes(exported, tmp_path):
    ds, _ = exported
    out = export_lerobot(ds, tmp_path / 'lrds', episodes=[2, 0])
    info = json.loads((out / INFO_PATH).read_text())
    assert (info['total_episodes'], info['total_frames'], info['splits']) == (2, 7, {'train': '0:2'})
    assert check_lerobot_layout(out) == []
    back = import_lerobot(out, tmp_path / 'back')
    assert [e['episode_index'] for e in back.episodes] == [0, 5]
    np.testing.assert_array_equal(back.load_episode(1)[IMAGE], ds.load_episode(2)[IMAGE])
    val = export_lerobot(ds, tmp_path / 'val', episodes='val', val_frac=0.34, seed=3)
    from vla_nb.data import split_episodes
    picked = split_episodes(3, 0.34, 3)[1]
    assert json.loads((val / INFO_PATH).read_text())['total_frames'] == sum(EPISODES[k][2] for k in picked)
    for bad, msg in (([3], 'positions 0..2'), ([0, 0], 'twice'), ('test', 'episodes'), ([], 'no episodes'), ([1.0], 'positions')):
        with pytest.raises(ValueError, match=msg):
            export_lerobot(ds, tmp_path / 'bad', episodes=bad)
    assert not (tmp_path / 'bad').exists()


# ---- with the real `lerobot` package (optional) ----

needs_lerobot = pytest.mark.skipif(importlib.util.find_spec('lerobot') is None,
                                   reason='the optional `lerobot` package is not installed')


@needs_lerobot
def test_lerobot_package_loads_export(exported):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds, out = exported
    lrds = LeRobotDataset('local/vla_nb_export', root=out)
    assert (lrds.num_episodes, lrds.num_frames) == (3, 13)
    item = lrds[5]                                              # episode 1, frame 1
    np.testing.assert_allclose(item['action'].numpy(), ds.load_episode(1)[ACTION][1], atol=1e-6)
    img = (item['observation.image'].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(img, ds.load_episode(1)[IMAGE][1])
    assert item['task'] == 'find the red cup'


def lerobot_frames(lrds, key):
    return np.stack([(lrds[i][key].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0) for i in range(lrds.num_frames)])


@needs_lerobot
def test_lerobot_package_decodes_video_export_as_we_do(video_export, tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds, out = video_export
    lrds = LeRobotDataset('local/vla_nb_video', root=out, video_backend='pyav')
    back = import_lerobot(out, tmp_path / 'back')
    for cam, name in ((IMAGE, 'observation.image'), (WRIST_IMAGE, 'observation.images.wrist')):
        ours = np.concatenate([back.load_episode(k)[cam] for k in range(3)])
        np.testing.assert_array_equal(lerobot_frames(lrds, name), ours)
    np.testing.assert_allclose(lrds[7]['action'].numpy(), ds.load_episode(1)[ACTION][3], atol=1e-6)


@needs_lerobot
def test_lerobot_package_reads_script_dataset(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    expected = write_lerobot_video_dataset(tmp_path / 'lrds')
    lrds = LeRobotDataset('local/script_video', root=tmp_path / 'lrds', video_backend='pyav')
    for name, want in expected.items():
        np.testing.assert_array_equal(lerobot_frames(lrds, name), want)


@needs_lerobot
def test_lerobot_recompute_stats_reproduces_the_file(exported, tmp_path):
    from lerobot.datasets.dataset_tools import recompute_stats
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds, out = exported
    before = json.loads((out / STATS_PATH).read_text())
    copy = copy_of(out, tmp_path)
    recompute_stats(LeRobotDataset('local/copy', root=copy))
    after = json.loads((copy / STATS_PATH).read_text())
    for k in ('observation.state', 'action', 'next.success', 'next.done'):
        for s_ in before[k]:
            np.testing.assert_array_equal(np.asarray(after[k][s_], np.float64), np.asarray(before[k][s_], np.float64),
                                          err_msg=f'{k}/{s_}')


@needs_lerobot
def test_lerobot_modify_tasks_then_import(exported, tmp_path):
    from lerobot.datasets.dataset_tools import modify_tasks
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds, out = exported
    copy = copy_of(out, tmp_path)
    modify_tasks(LeRobotDataset('local/copy', root=copy), episode_tasks={0: 'grab the book'})
    assert check_lerobot_layout(copy) == []
    with pytest.warns(UserWarning, match='episodes \\[0\\]'):
        back = import_lerobot(copy, tmp_path / 'back')
    assert [e['command'] for e in back.episodes] == ['grab the book', 'find the red cup', 'pick up the book']
    assert back.episodes[0]['task'] is None and back.episodes[2]['task'] == ds.episodes[2]['task']
