"""Write a small LeRobotDataset v3.0 with video cameras the way LeRobot 0.6 does, using PyAV and pyarrow only.

Independent of `vla_nb.lerobot`: each episode is encoded to its own mp4 (pts in frames, time base 1/fps, as
`_CameraEncoderThread`), the episodes are joined by stream copy through FFmpeg's concat demuxer (as
`concatenate_video_files`), and each episode's `from_timestamp`/`to_timestamp` come from the running sum of the episode
files' durations (as `_save_episode_video` with `get_video_duration_in_s`). The expected frames are what PyAV gives when
it decodes each episode's own file from its first frame: `expected.npz`, one (total_frames, H, W, 3) array per camera.

    python tests/make_lerobot_video.py OUT_DIR
"""

import argparse
import json
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FPS = 15
LENGTHS = (7, 12, 5)
TASKS = ('stack the red block', 'open the drawer')
EPISODE_TASK = (0, 1, 0)
# camera -> (height, width, codec options, episodes per file): the front camera keeps a longer GOP so reads must seek
# back to a keyframe; the wrist camera uses H.264 and rolls over to a second file after two episodes.
CAMERAS = {
    'observation.images.front': (48, 64, 'libsvtav1', {'g': '5', 'crf': '30', 'preset': '12'}, 3),
    'observation.images.wrist': (32, 32, 'h264', {'g': '3', 'crf': '23'}, 2),
}


def scene(T, height, width, seed):
    "Smooth frames: a gradient and a square moving across it."
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 60 + 40 * seed)], -1).astype(np.uint8)
    ims = np.repeat(base[None], T, 0)
    for t in range(T):
        x0 = (3 * t + 5 * seed) % (width - 10)
        ims[t, height // 3 : height // 3 + 10, x0 : x0 + 10] = (220, 200 - 30 * seed, 30)
    return ims


def encode(frames, path, codec, options):
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner to stderr otherwise
    with av.open(str(path), 'w') as c:
        s = c.add_stream(codec, FPS, options=options)
        s.pix_fmt, s.height, s.width, s.time_base = 'yuv420p', frames.shape[1], frames.shape[2], Fraction(1, FPS)
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format='rgb24')
            f.pts, f.time_base = i, Fraction(1, FPS)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_all(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


def duration(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return float(s.duration * s.time_base)


def concatenate(paths, out):
    "Stream-copy `paths` into `out` through the concat demuxer, as LeRobot's `concatenate_video_files`."
    lst = Path(tempfile.mkdtemp()) / 'list.ffconcat'
    lst.write_text('ffconcat version 1.0\n' + ''.join(f"file '{Path(p).resolve()}'\n" for p in paths))
    with av.open(str(lst), 'r', format='concat', options={'safe': '0'}) as src:
        with av.open(str(out), 'w', options={'movflags': 'faststart'}) as dst:
            ins = src.streams.video[0]
            o = dst.add_stream_from_template(template=ins, opaque=True)
            o.time_base = ins.time_base
            for pkt in src.demux(ins):
                if pkt.dts is None:
                    continue
                pkt.stream = o
                dst.mux(pkt)
    shutil.rmtree(lst.parent)


def write_videos(root, tmp):
    "Encode every camera; return the episode columns per camera and the expected frames per camera."
    cols, expected = {}, {}
    for cam, (H, W, codec, opts, per_file) in CAMERAS.items():
        files, expected[cam], cols[cam] = {}, [], []
        for e, T in enumerate(LENGTHS):
            p = tmp / f'{cam}-{e}.mp4'
            encode(scene(T, H, W, e), p, codec, opts)
            expected[cam].append(decode_all(p))
            files.setdefault(e // per_file, []).append(p)
        for fi, paths in files.items():
            start = 0.0
            for p in paths:
                cols[cam].append((0, fi, start, start + duration(p)))
                start += duration(p)
            out = root / f'videos/{cam}/chunk-000/file-{fi:03d}.mp4'
            out.parent.mkdir(parents=True, exist_ok=True)
            concatenate(paths, out)
        expected[cam] = np.concatenate(expected[cam])
    return cols, expected


def video_feature(cam, root):
    H, W, codec, opts, _ = CAMERAS[cam]
    with av.open(str(root / f'videos/{cam}/chunk-000/file-000.mp4')) as c:
        s = c.streams.video[0]
        name = s.codec_context.codec.canonical_name
    info = {'video.height': H, 'video.width': W, 'video.codec': name, 'video.pix_fmt': 'yuv420p', 'video.fps': FPS}
    info.update({'video.channels': 3, 'has_audio': False, 'video.g': int(opts['g']), 'is_depth_map': False})
    return dict(dtype='video', shape=[H, W, 3], names=['height', 'width', 'channels'], info=info)


def stats_of(x, image=False):
    "min/max/mean/std/count; images per channel in [0, 1] with shape (3, 1, 1)."
    n = len(x)
    x = np.asarray(x, np.float64).reshape(-1, 3) / 255 if image else np.asarray(x, np.float64).reshape(n, -1)
    s = dict(min=x.min(0), max=x.max(0), mean=x.mean(0), std=x.std(0))
    return {**{k: (v.reshape(3, 1, 1) if image else v).tolist() for k, v in s.items()}, 'count': [n]}


def write_dataset(root) -> dict:
    "Write the dataset at `root`; return the expected frames per camera (also saved as root/expected.npz)."
    root, tmp = Path(root), Path(tempfile.mkdtemp())
    try:
        cols, expected = write_videos(root, tmp)
    finally:
        shutil.rmtree(tmp)
    g = np.random.default_rng(0)
    N = sum(LENGTHS)
    ep_of = np.repeat(np.arange(len(LENGTHS)), LENGTHS)
    state, action = g.normal(size=(N, 3)).astype(np.float32), g.uniform(-1, 1, (N, 2)).astype(np.float32)
    frame_index = np.concatenate([np.arange(T) for T in LENGTHS])
    data = pa.table(
        {
            'observation.state': pa.FixedSizeListArray.from_arrays(pa.array(state.ravel()), 3),
            'action': pa.FixedSizeListArray.from_arrays(pa.array(action.ravel()), 2),
            'timestamp': pa.array((frame_index / FPS).astype(np.float32)),
            'frame_index': pa.array(frame_index.astype(np.int64)),
            'episode_index': pa.array(ep_of.astype(np.int64)),
            'index': pa.array(np.arange(N, dtype=np.int64)),
            'task_index': pa.array(np.array(EPISODE_TASK, np.int64)[ep_of]),
        }
    )
    (root / 'data/chunk-000').mkdir(parents=True)
    pq.write_table(data, root / 'data/chunk-000/file-000.parquet')
    features = {cam: video_feature(cam, root) for cam in CAMERAS}
    features['observation.state'] = dict(dtype='float32', shape=[3], names=['x', 'y', 'z'])
    features['action'] = dict(dtype='float32', shape=[2], names=['vx', 'vy'])
    for k, dt in (('timestamp', 'float32'), ('frame_index', 'int64'), ('episode_index', 'int64')):
        features[k] = dict(dtype=dt, shape=[1], names=None)
    features.update(
        index=dict(dtype='int64', shape=[1], names=None), task_index=dict(dtype='int64', shape=[1], names=None)
    )
    write_meta(root, features, cols, state, action, data, expected)
    np.savez(root / 'expected.npz', **{cam.replace('.', '_'): x for cam, x in expected.items()})
    return expected


def write_meta(root, features, cols, state, action, data, expected):
    ends = np.cumsum(LENGTHS)
    rows = []
    for e, T in enumerate(LENGTHS):
        r = {'episode_index': e, 'tasks': [TASKS[EPISODE_TASK[e]]], 'length': T, 'data/chunk_index': 0}
        r.update({'data/file_index': 0, 'dataset_from_index': int(ends[e] - T), 'dataset_to_index': int(ends[e])})
        for cam in CAMERAS:
            c, f, a, b = cols[cam][e]
            r.update({f'videos/{cam}/chunk_index': c, f'videos/{cam}/file_index': f})
            r.update({f'videos/{cam}/from_timestamp': a, f'videos/{cam}/to_timestamp': b})
        r.update({'meta/episodes/chunk_index': 0, 'meta/episodes/file_index': 0})
        rows.append(r)
    (root / 'meta/episodes/chunk-000').mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / 'meta/episodes/chunk-000/file-000.parquet')
    col = lambda name, kind, np_kind: dict(
        name=name, field_name=name, pandas_type=kind, numpy_type=np_kind, metadata=None
    )
    pandas = {  # what DataFrame.to_parquet writes for modify_tasks' frame: the task strings are the index, named 'task'
        'index_columns': ['task'],
        'column_indexes': [],
        'columns': [col('task_index', 'int64', 'int64'), col('task', 'unicode', 'object')],
    }
    tasks = pa.table({'task_index': pa.array([0, 1], pa.int64()), 'task': pa.array(list(TASKS))})
    pq.write_table(tasks.replace_schema_metadata({'pandas': json.dumps(pandas)}), root / 'meta/tasks.parquet')
    stats = {cam: stats_of(x, image=True) for cam, x in expected.items()}
    stats.update({'observation.state': stats_of(state), 'action': stats_of(action)})
    for k in ('timestamp', 'frame_index', 'episode_index', 'index', 'task_index'):
        stats[k] = stats_of(data[k].to_numpy())
    (root / 'meta/stats.json').write_text(json.dumps(stats, indent=2))
    info = dict(codebase_version='v3.0', robot_type='toy', total_episodes=len(LENGTHS), total_frames=int(ends[-1]))
    info.update(total_tasks=len(TASKS), chunks_size=1000, data_files_size_in_mb=100, video_files_size_in_mb=200)
    info.update(
        fps=FPS,
        splits={'train': f'0:{len(LENGTHS)}'},
        data_path='data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet',
    )
    info.update(video_path='videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4', features=features)
    (root / 'meta/info.json').write_text(json.dumps(info, indent=4))


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out', help='directory to create')
    a = ap.parse_args()
    exp = write_dataset(a.out)
    print(json.dumps({cam: list(x.shape) for cam, x in exp.items()}))
