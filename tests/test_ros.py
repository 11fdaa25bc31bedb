"Contracts of the real-robot data path (vla_nb.ros): rosbag2 ingestion in both storages, synchronization, bad bags, the live node."
import copy, json, shutil, sys, time, types, warnings
import numpy as np
import pytest
from rosbags.rosbag2 import Reader
from vla_nb import sim
from vla_nb.core import derive_seed
from vla_nb.data import EpisodeDataset, EpisodeWriter, validate_dataset, IMAGE, PROPRIO, ACTION, SUCCESS, TIMESTAMP
from vla_nb.ros import (StreamSynchronizer, JointStateMerger, RealDataCollector, RosbagWarning, ingest_rosbag, write_bag,
                        write_demo_bag, demo_records, synthetic_bag, image_msg, joint_state_msg, string_msg, float_array_msg,
                        ros_image_to_rgb, command_text, DEMO_JOINTS, _rollout)

MS = 10**6


@pytest.fixture(scope='module')
def records():
    "Two expert rollouts as bag records (deep-copy before altering)."
    return demo_records(2, seed=0)


@pytest.fixture(scope='module')
def rollouts():
    env = sim.TabletopEnv(sim.SimConfig(image_size=128))
    try: yield [_rollout(env, derive_seed(0, 'demo-bag', k)) for k in range(2)]   # the episodes demo_records(seed=0) ran
    finally: env.close()


def recs(records): return copy.deepcopy(records)


def ingest_quiet(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('error', RosbagWarning)   # a clean bag gives no warning
        return ingest_rosbag(*a, **kw)


# --- round trips -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_roundtrip_matches_the_simulator(tmp_path, records, rollouts, storage):
    bag = write_bag(tmp_path/'bag', recs(records), storage)
    with Reader(bag) as r: assert r.topics['/camera/image_raw'].msgtype == 'sensor_msgs/msg/Image'
    rep = ingest_quiet(bag, tmp_path/'ds')
    ds = EpisodeDataset(tmp_path/'ds')
    assert rep['episodes'] == len(ds) == 2 and rep['frames'] == ds.num_frames
    assert validate_dataset(tmp_path/'ds') == []
    for k, (cmd, imgs, qs) in enumerate(rollouts):
        ep, e = ds.load_episode(k), ds.episodes[k]
        assert e['command'] == cmd and e['task'] is None and e['meta']['success_label'] == 'assumed'
        T = len(qs) - 1                                   # the last observation has no next tick, so no action
        assert {k2: v.shape for k2, v in ep.items()} == {IMAGE: (T, 96, 96, 3), PROPRIO: (T, 18), ACTION: (T, 7), SUCCESS: (T,), TIMESTAMP: (T,)}
        np.testing.assert_allclose(ep[PROPRIO][:, :9], qs[:-1], atol=1e-5)            # positions, then velocities
        np.testing.assert_allclose(ep[ACTION], np.diff(qs[:, :7], axis=0) * 10 / 2.5, atol=1e-5)
        np.testing.assert_allclose(ep[TIMESTAMP], np.arange(T) / 10, atol=1e-9)
        assert ep[SUCCESS].tolist() == [False] * (T - 1) + [True]
        ref = np.stack([ros_image_to_rgb(image_msg(im), 96) for im in imgs[:-1]])
        assert np.array_equal(ep[IMAGE], ref)


def test_mcap_and_sqlite3_give_the_same_dataset(tmp_path, records):
    for st in ('mcap', 'sqlite3'): ingest_quiet(write_bag(tmp_path/st, recs(records), st), tmp_path/f'ds_{st}')
    a, b = EpisodeDataset(tmp_path/'ds_mcap'), EpisodeDataset(tmp_path/'ds_sqlite3')
    for k in range(len(a)):
        ea, eb = a.load_episode(k), b.load_episode(k)
        assert all(np.array_equal(ea[f], eb[f]) for f in ea)


def test_write_demo_bag_and_encodings(tmp_path):
    for enc in ('bgr8', 'mono8'):
        bag = write_demo_bag(tmp_path/enc, storage='sqlite3', episodes=1, encoding=enc)
        rep = ingest_quiet(bag, tmp_path/f'ds_{enc}')
        img = EpisodeDataset(tmp_path/f'ds_{enc}').load_episode(0)[IMAGE]
        assert rep['episodes'] == 1 and img.shape[1:] == (96, 96, 3)
        if enc == 'mono8': assert np.array_equal(img[..., 0], img[..., 2])


def test_unsorted_log_times_are_read_in_order(tmp_path, records):
    "rosbag2 readers return messages by log time, so a bag written out of order ingests exactly like a sorted one."
    shuffled = recs(records); np.random.default_rng(0).shuffle(shuffled)
    ingest_quiet(write_bag(tmp_path/'shuf', shuffled, 'sqlite3'), tmp_path/'a')
    ingest_quiet(write_bag(tmp_path/'sort', recs(records), 'sqlite3'), tmp_path/'b')
    a, b = EpisodeDataset(tmp_path/'a'), EpisodeDataset(tmp_path/'b')
    assert [e['length'] for e in a.episodes] == [e['length'] for e in b.episodes]
    assert np.array_equal(a.load_episode(1)[ACTION], b.load_episode(1)[ACTION])


def test_header_time_source(tmp_path, records):
    rep = ingest_quiet(write_bag(tmp_path/'bag', recs(records)), tmp_path/'ds', time_source='header')
    assert rep['episodes'] == 2 and validate_dataset(tmp_path/'ds') == []


# --- synchronization -------------------------------------------------------------------------------------------------------

def test_synchronizer_previous_sample_never_looks_ahead():
    s = StreamSynchronizer(fps=10)
    out = []
    for t, st, v in [(0, 'image', 'i0'), (5 * MS, 'joints', 'j0'), (99 * MS, 'image', 'i1'), (105 * MS + 1, 'image', 'future'),
                     (106 * MS, 'joints', 'j1'), (300 * MS, 'joints', 'j2')]:
        out += s.push(st, t, v)
    assert [(tk['t'] // MS, tk['data'].get('image'), tk['data'].get('joints'), tk['ok']) for tk in out] == \
        [(5, 'i0', 'j0', True), (105, 'i1', 'j0', True), (205, 'future', 'j1', True)]
    assert out[1]['age'] == dict(image=6 * MS, joints=100 * MS)


def test_synchronizer_staleness_late_duplicates_and_restart():
    s = StreamSynchronizer(fps=10, max_age_s=dict(image=0.05))
    ticks = s.push('image', 0, 'a') + s.push('joints', 0, 'j')
    for t in range(10 * MS, 200 * MS, 10 * MS): ticks += s.push('joints', t, t)
    ticks += s.advance(200 * MS)
    assert [tk['ok'] for tk in ticks] == [True, False] and ticks[1]['stale'] == ['image']
    s.push('joints', 50 * MS, 'late'); s.push('joints', 190 * MS, 'dup')
    assert s.counts['late']['joints'] == 1 and s.counts['duplicate']['joints'] == 1
    assert [tk['t'] for tk in s.advance(10**9)] == [200 * MS, 300 * MS]              # joints fresh up to 200 ms after the last
    assert s.t0 is None and s.counts['silences'] == 1                                 # then the clock stops
    s.push('joints', 5 * 10**9, 'x'); assert s.t0 is None                             # image still missing
    s.push('image', 5 * 10**9 + 1, 'y'); assert s.t0 == 5 * 10**9 + 1
    with pytest.raises(ValueError, match='lidar'): StreamSynchronizer(10, max_age_s=dict(lidar=1))
    with pytest.raises(ValueError, match="unknown stream 'lidar'"): s.push('lidar', 0, None)


def test_joint_state_merger_and_commands():
    m = JointStateMerger()
    names, pos, vel = m.update(joint_state_msg(['a', 'b'], [1, 2], [0.1, 0.2]))   # no fixed order: the message's joints
    assert names == ('a', 'b') and pos.tolist() == [1, 2] and np.allclose(vel, [0.1, 0.2])
    m2 = JointStateMerger(['arm', 'finger'])
    assert m2.update(joint_state_msg(['arm'], [1.0])) is None and m2.missing() == ['finger']
    names, pos, vel = m2.update(joint_state_msg(['finger', 'extra'], [0.04, 9.0]))
    assert names == ('arm', 'finger') and pos.tolist() == [1.0, 0.04] and vel is None
    with pytest.raises(ValueError, match='2 names but 1 positions'): m.update(joint_state_msg(['a', 'b'], [1]))
    assert command_text('{"command": "find the book", "episode": 3}') == 'find the book' and command_text('{"command": null}') == ''
    with pytest.raises(ValueError, match="no 'command' key"): command_text('{"cmd": "x"}')


def test_episode_boundaries_from_gaps_and_idle(tmp_path):
    "The same command twice, separated first by a gap, then by an idle ('') command, gives three episodes."
    names, r = DEMO_JOINTS[:7], []
    def segment(t0, n, cmd=None):
        if cmd is not None: r.append(('/command_log', t0 - MS, string_msg(cmd)))
        for k in range(n):
            t = t0 + k * 50 * MS
            r.append(('/camera/image_raw', t + MS, image_msg(np.full((32, 32, 3), k, np.uint8), t)))
            r.append(('/joint_states', t, joint_state_msg(names, np.full(7, 0.01 * k), None, t)))
    segment(10**9, 20, 'wave'); segment(5 * 10**9, 20); segment(8 * 10**9, 10, ''); segment(10 * 10**9, 20, 'wave')
    rep = ingest_quiet(write_bag(tmp_path/'bag', sorted(r, key=lambda x: x[1])), tmp_path/'ds')
    ds = EpisodeDataset(tmp_path/'ds')
    assert [e['command'] for e in ds.episodes] == ['wave'] * 3 and rep['dropped']['idle_ticks'] > 0
    assert [e['length'] for e in ds.episodes] == [10] * 3          # 20 samples at 20 Hz -> 10 ticks at 10 Hz
    np.testing.assert_allclose(ds.load_episode(0)[ACTION][:-1], 0.02 * 10 / 2.5, atol=1e-6)


def test_commanded_action_topic(tmp_path, records):
    r, acts = recs(records), {}
    for topic, t, m in list(r):
        if topic == '/joint_states' and (t // MS) % 100 == 42:    # one command per 100 ms, sent just after the joints
            a = np.sin(t / 1e9 + np.arange(7)).astype(np.float32); acts[t] = a
            r.append(('/action', t + MS, float_array_msg(a)))
    r.sort(key=lambda x: x[1])
    rep = ingest_quiet(write_bag(tmp_path/'bag', r), tmp_path/'ds', action_topic='/action')
    ep = EpisodeDataset(tmp_path/'ds').load_episode(0)
    sent = np.stack([acts[t] for t in sorted(acts)])
    assert rep['episodes'] == 2 and np.isin(ep[ACTION][:, 0], sent[:, 0]).all()
    bad = recs(records) + [('/action', records[5][1], float_array_msg(np.zeros(6)))]
    with pytest.raises(ValueError, match='7 values, got 6'):
        ingest_rosbag(write_bag(tmp_path/'bad', sorted(bad, key=lambda x: x[1])), tmp_path/'ds2', action_topic='/action')


def test_proprio_fn_and_action_joints(tmp_path, records):
    bag = write_bag(tmp_path/'bag', recs(records))
    ingest_quiet(bag, tmp_path/'ds', proprio_fn=lambda names, pos, vel: pos[:7],
                 action_joints=list(DEMO_JOINTS[2:9]))
    ep = EpisodeDataset(tmp_path/'ds').load_episode(0)
    assert ep[PROPRIO].shape[1] == 7 and np.abs(ep[ACTION][:, -2:]).max() > 0     # finger joints now in the action
    with pytest.raises(ValueError, match="'elbow'"): ingest_rosbag(bag, tmp_path/'ds2', action_joints=['elbow'] * 7)


# --- bad bags --------------------------------------------------------------------------------------------------------------

def test_missing_topic_and_wrong_type(tmp_path, records):
    bag = write_bag(tmp_path/'bag', recs(records))
    with pytest.raises(ValueError, match=r"no joints topic '/joints'; its topics: /camera/image_raw \[sensor_msgs/msg/Image\]"):
        ingest_rosbag(bag, tmp_path/'ds', joint_topic='/joints')
    with pytest.raises(ValueError, match="carries sensor_msgs/msg/JointState, but the image stream must be sensor_msgs/msg/Image"):
        ingest_rosbag(bag, tmp_path/'ds', image_topic='/joint_states')
    with pytest.raises(ValueError, match='command_topic or a default_command'): ingest_rosbag(bag, tmp_path/'ds', command_topic=None)
    assert not (tmp_path/'ds').exists()
    no_cmd = write_bag(tmp_path/'nocmd', [r for r in recs(records) if r[0] != '/command_log'])
    assert ingest_quiet(no_cmd, tmp_path/'ds3', command_topic=None, default_command='tidy up')['episodes'] == 2   # split by the gap alone


@pytest.mark.parametrize('enc', ['16UC1', 'bayer_rggb8', 'yuv422'])
def test_unknown_encoding(tmp_path, records, enc):
    r = recs(records)
    for topic, _, m in r:
        if topic == '/camera/image_raw': m.encoding = enc
    with pytest.raises(ValueError, match=f"unsupported image encoding '{enc}'; supported: rgb8, bgr8, mono8"):
        ingest_rosbag(write_bag(tmp_path/'bag', r), tmp_path/'ds')
    assert not (tmp_path/'ds').exists()


@pytest.mark.parametrize('storage,frac', [('mcap', 0.5), ('mcap', 0.95), ('sqlite3', 0.5), ('sqlite3', 0.9)])
def test_truncated_bag(tmp_path, records, storage, frac):
    bag = write_bag(tmp_path/'bag', recs(records), storage)
    f = next(p for p in bag.iterdir() if p.suffix in ('.mcap', '.db3'))
    f.write_bytes(f.read_bytes()[:int(f.stat().st_size * frac)])
    with pytest.raises(ValueError, match='truncated or corrupt'): ingest_rosbag(bag, tmp_path/'ds')
    assert not (tmp_path/'ds').exists()                       # nothing written


def test_not_a_bag(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'): ingest_rosbag(tmp_path/'nope', tmp_path/'ds')
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='cannot open rosbag2'): ingest_rosbag(tmp_path/'empty', tmp_path/'ds')


def test_duplicate_log_timestamps_warn(tmp_path, records):
    r = recs(records)
    js = [i for i, x in enumerate(r) if x[0] == '/joint_states']
    for i in reversed(js[10:13]): r.insert(i + 1, copy.deepcopy(r[i]))
    with pytest.warns(RosbagWarning, match=r"3 message\(s\) on /joint_states repeated the previous message's timestamp"):
        rep = ingest_rosbag(write_bag(tmp_path/'bag', r), tmp_path/'ds')
    assert rep['dropped']['duplicate'] == {'joints': 3} and rep['episodes'] == 2 and validate_dataset(tmp_path/'ds') == []


def test_unsorted_header_stamps_warn(tmp_path, records):
    r = recs(records)
    imgs = [m for t, _, m in r if t == '/camera/image_raw']
    for m in imgs[60:63]: m.header.stamp.sec -= 1            # a camera clock jumping back
    with pytest.warns(RosbagWarning, match=r"3 message\(s\) on /camera/image_raw were stamped earlier .* \(unsorted\)"):
        rep = ingest_rosbag(write_bag(tmp_path/'bag', r), tmp_path/'ds', time_source='header')
    assert rep['dropped']['late'] == {'image': 3} and validate_dataset(tmp_path/'ds') == []


def test_missing_header_stamps(tmp_path, records):
    r = recs(records)
    for t, _, m in r:
        if t == '/joint_states': m.header.stamp.sec = m.header.stamp.nanosec = 0
    with pytest.raises(ValueError, match="no header stamp; use time_source='receive'"):
        ingest_rosbag(write_bag(tmp_path/'bag', r), tmp_path/'ds', time_source='header')


def test_clipped_actions_warn(tmp_path, records):
    with pytest.warns(RosbagWarning, match='clipped to \\[-1, 1\\]; raise max_joint_speed'):
        rep = ingest_rosbag(write_bag(tmp_path/'bag', recs(records)), tmp_path/'ds', max_joint_speed=0.5)
    assert rep['clipped_action_values'] > 0 and np.abs(EpisodeDataset(tmp_path/'ds').load_episode(0)[ACTION]).max() <= 1


def test_no_episode_is_an_error(tmp_path, records):
    bag = write_bag(tmp_path/'bag', recs(records))
    with pytest.raises(ValueError, match=r"joints never complete, missing \['gripper_base'\]"):
        ingest_rosbag(bag, tmp_path/'ds', joint_names=list(DEMO_JOINTS) + ['gripper_base'])
    with pytest.raises(ValueError, match='no episode was written'): ingest_rosbag(bag, tmp_path/'ds2', min_episode_frames=1000)


def test_camera_dropouts_warn(tmp_path, records):
    slow = [r for r in recs(records) if r[0] != '/camera/image_raw' or (r[1] // MS) % 1000 < 40]   # one image per second
    with pytest.warns(RosbagWarning, match='lacked a recent image or joint state'):
        rep = ingest_rosbag(write_bag(tmp_path/'slow', slow), tmp_path/'ds')
    assert rep['dropped']['ticks_not_ok'] > rep['frames']


# --- atomicity and resume --------------------------------------------------------------------------------------------------

def test_crash_mid_ingest_leaves_whole_episodes_and_resumes(tmp_path, records, monkeypatch):
    bag = write_bag(tmp_path/'bag', recs(records))
    real, calls = EpisodeWriter.add_episode, []
    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt('power cut')
        return real(self, *a, **kw)
    monkeypatch.setattr(EpisodeWriter, 'add_episode', flaky)
    with pytest.raises(KeyboardInterrupt): ingest_rosbag(bag, tmp_path/'ds')
    monkeypatch.setattr(EpisodeWriter, 'add_episode', real)
    assert len(EpisodeDataset(tmp_path/'ds')) == 1
    rep = ingest_quiet(bag, tmp_path/'ds')
    assert (rep['episodes'], rep['skipped_existing']) == (1, 1) and validate_dataset(tmp_path/'ds') == []
    again = ingest_quiet(bag, tmp_path/'ds')
    assert (again['episodes'], again['skipped_existing'], again['dataset_episodes']) == (0, 2, 2)
    other = write_bag(tmp_path/'bag2', demo_records(1, seed=5), 'sqlite3')             # another bag appends
    assert ingest_quiet(other, tmp_path/'ds')['episode_indices'] == [2]
    with pytest.raises(ValueError, match='fps=10'): ingest_rosbag(other, tmp_path/'ds', fps=5)


# --- the live node ---------------------------------------------------------------------------------------------------------

def test_real_data_collector_without_ros(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'rclpy', None)        # even where ROS 2 is installed
    with pytest.raises(ImportError, match=r"install ROS 2 \(e.g. Humble/Jazzy\) and source its setup.bash; rclpy and cv_bridge come with it"):
        RealDataCollector(tmp_path/'live')
    assert not (tmp_path/'live').exists()


class FakeNode:
    def __init__(self, name): self.subs, self.timers, self.now, self.destroyed = {}, [], 0, False
    def create_subscription(self, typ, topic, cb, qos): self.subs[topic] = (typ, cb)
    def create_timer(self, period, cb): self.timers.append((period, cb))
    def get_clock(self): return types.SimpleNamespace(now=lambda: types.SimpleNamespace(nanoseconds=self.now))
    def get_logger(self): return types.SimpleNamespace(info=lambda m: None, error=lambda m: None)
    def destroy_node(self): self.destroyed = True


@pytest.fixture
def fake_ros(monkeypatch):
    mods = {n: types.ModuleType(n) for n in ('rclpy', 'rclpy.node', 'sensor_msgs', 'sensor_msgs.msg', 'std_msgs', 'std_msgs.msg')}
    mods['rclpy.node'].Node = FakeNode
    for n in ('Image', 'JointState'): setattr(mods['sensor_msgs.msg'], n, n)
    for n in ('String', 'Float32MultiArray'): setattr(mods['std_msgs.msg'], n, n)
    for n, m in mods.items(): monkeypatch.setitem(sys.modules, n, m)


def test_live_node_writes_what_ingestion_writes(tmp_path, records, fake_ros):
    ingest_quiet(write_bag(tmp_path/'bag', recs(records)), tmp_path/'offline')
    live = RealDataCollector(tmp_path/'live', collection_rate=10, save_every_s=5)
    assert {t: typ for t, (typ, _) in live.node.subs.items()} == {'/camera/image_raw': 'Image', '/joint_states': 'JointState', '/command_log': 'String'}
    (period, on_timer), (save_period, on_save) = live.node.timers
    assert period == 0.1 and save_period == 5
    saved_midway = False
    for topic, t, m in recs(records):
        while live.node.now + 10**8 < t: live.node.now += 10**8; on_timer()
        live.node.now = t; live.node.subs[topic][1](m)
        if not saved_midway and live.writer.index: on_save(); saved_midway = True      # the first episode is already usable
    assert saved_midway and len(EpisodeDataset(tmp_path/'live')) == 1 and (tmp_path/'live/meta/stats.json').exists()
    live.close()
    assert live.node.destroyed
    a, b = EpisodeDataset(tmp_path/'live'), EpisodeDataset(tmp_path/'offline')
    assert [e['command'] for e in a.episodes] == [e['command'] for e in b.episodes] and a.info['total_episodes'] == 2
    for k in range(len(b)):
        ea, eb = a.load_episode(k), b.load_episode(k)
        assert all(np.array_equal(ea[f], eb[f]) for f in eb)


# --- speed -----------------------------------------------------------------------------------------------------------------

@pytest.mark.timing
def test_ingest_costs_little_more_than_reading_the_bag(tmp_path):
    "Ingesting a 30 Hz 480x640 bag takes at most 2.5x the time to merely read it (deserialize every message, convert every frame)."
    from vla_nb.ros import TYPESTORE
    bag = synthetic_bag(tmp_path/'big', seconds=10, camera_hz=30, joint_hz=100, hw=(480, 640))
    t = time.perf_counter()
    with Reader(bag) as r:
        for conn, _, raw in r.messages():
            m = TYPESTORE.deserialize_cdr(raw, conn.msgtype)
            if conn.topic == '/camera/image_raw': ros_image_to_rgb(m, 96)
    read_s = time.perf_counter() - t
    t = time.perf_counter(); rep = ingest_quiet(bag, tmp_path/'ds'); ingest_s = time.perf_counter() - t
    assert rep['messages']['/camera/image_raw'] == 300 and rep['frames'] == 100
    assert ingest_s <= 2.5 * read_s, f"ingest {ingest_s:.2f} s vs reading the bag {read_s:.2f} s"
