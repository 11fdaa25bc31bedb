"Contracts of the LeRobot interop chapter (vla_nb.lerobot): v3.0 export/import round trip, layout checks, clear errors."
import importlib.util
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla_nb.data import ACTION, IMAGE, PROPRIO, SUCCESS, TIMESTAMP, WRIST_IMAGE, EpisodeDataset, EpisodeWriter
from vla_nb.lerobot import (CODEBASE_VERSION, DATA_PATH, EPISODES_PATH, INFO_PATH, SIDECAR_PATH, STATS_PATH, TASKS_PATH,
                            check_lerobot_layout, export_lerobot, import_lerobot, read_tasks)

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
    return ds, export_lerobot(ds, base / 'lr')


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
    out = export_lerobot(ds.root, tmp_path / 'lr', data_files_size_in_mb=1e-4)
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
    ds = make_dataset(tmp_path / 'ours')
    out = export_lerobot(ds, tmp_path / 'lr', image_format='jpeg')
    assert check_lerobot_layout(out) == []
    back = import_lerobot(out, tmp_path / 'back')
    assert back.load_episode(0)[IMAGE].shape == ds.load_episode(0)[IMAGE].shape


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
        export_lerobot(ds, tmp_path / 'lr')
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


def test_video_only_camera_is_explained(exported, tmp_path):
    def to_video(i): i['features']['observation.image']['dtype'] = 'video'
    bad = edit_info(copy_of(exported[1], tmp_path), to_video)
    with pytest.raises(ValueError, match='video decoding is not supported here') as e:
        import_lerobot(bad, tmp_path / 'x')
    assert 'lerobot' in str(e.value)                          # says what to do instead


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


@pytest.mark.skipif(importlib.util.find_spec('lerobot') is None, reason='the optional `lerobot` package is not installed')
def test_lerobot_package_loads_export(exported):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    ds, out = exported
    lr = LeRobotDataset('local/vla_nb_export', root=out)
    assert (lr.num_episodes, lr.num_frames) == (3, 13)
    item = lr[5]                                              # episode 1, frame 1
    np.testing.assert_allclose(item['action'].numpy(), ds.load_episode(1)[ACTION][1], atol=1e-6)
    img = (item['observation.image'].numpy() * 255).round().astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(img, ds.load_episode(1)[IMAGE][1])
    assert item['task'] == 'find the red cup'
