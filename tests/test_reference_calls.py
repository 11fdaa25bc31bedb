"""The familiar call shapes, class by class: `VLAPretrainer(model, dataset, config)` with `learning_rate`,
`pretrain(num_epochs)` returning the final losses, `OptimizedVLAInference(path, device=...).inference(image, text)`,
`EdgeVLADeployer(path, use_quantized=...)`, `get_result(timeout=1.0)` that waits, and the rest.

One test per call; each asserts the value the call must produce, not only that it returns."""

import sys
import time
import types
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import SyntheticDataGenerator, DataConfig, EpisodeDataset, Normalizer, IMAGE, ACTION, PROPRIO
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
from vla_nb.pretraining import VLAPretrainer, PretrainDataset, PretrainConfig
from vla_nb.imitation import VLAImitationLearner, ImitationConfig
from vla_nb.deployment import (
    OptimizedVLAInference,
    EdgeVLADeployer,
    HardwareOptimizer,
    DeployConfig,
    export_artifact,
    calibration_observations,
    parity,
)
from vla_nb import ros

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.0)
LOSS_KEYS = ('vision_loss', 'language_loss', 'action_loss', 'alignment_loss', 'total_loss')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('calls') / 'data'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=8, image_size=48, seed=5)).generate_dataset(
        progress_bar=False
    )
    return EpisodeDataset(root)


def _net(ds):
    seed_everything(0)
    return VLANet(ModelConfig(**SMALL, vocab_size=ds.tokenizer.vocab_size, max_tokens=ds.tokenizer.max_len))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    "Run in an empty directory: configs without `out_dir`/`root` write under ./runs, as the reader's would."
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- VLAPretrainer ---------------------------------------------------------------------------------------------------

PRETRAIN_CONFIG = dict(
    learning_rate=2e-3,
    weight_decay=0.02,
    max_steps=40,
    vision_weight=1.0,
    language_weight=0.5,
    action_weight=1.0,
    alignment_weight=0.25,
    batch_size=16,
    num_workers=0,
    log_interval=5,
)


def _pretrainer(data, tmp, **kw):
    cfg = PretrainConfig(batch_size=16, warmup_steps=2, log_every=5, out_dir=str(tmp / 'pt'), tensorboard=False, **kw)
    return VLAPretrainer(_net(data), PretrainDataset(data), cfg)


def test_pretrainer_constructor_takes_the_familiar_config(data, in_tmp):
    pt = VLAPretrainer(_net(data), PretrainDataset(data), SimpleNamespace(**PRETRAIN_CONFIG))
    c = pt.config
    assert isinstance(c, PretrainConfig)
    assert (c.lr, c.weight_decay, c.max_steps, c.log_every, c.batch_size) == (2e-3, 0.02, 40, 5, 16)
    assert (c.language_weight, c.alignment_weight, pt.total_steps) == (0.5, 0.25, 40)
    assert pt.optimizer.param_groups[0]['weight_decay'] == 0.02
    with pytest.raises(ValueError, match=r"num_workers=4.*num_workers=0"):
        VLAPretrainer(_net(data), PretrainDataset(data), SimpleNamespace(**{**PRETRAIN_CONFIG, 'num_workers': 4}))
    with pytest.raises(ValueError, match=r"unknown PretrainConfig key\(s\) \['il_learning_rate'\]"):
        VLAPretrainer(_net(data), PretrainDataset(data), SimpleNamespace(**PRETRAIN_CONFIG, il_learning_rate=1e-4))
    with pytest.raises(ValueError, match="both set `lr`"):
        VLAPretrainer(_net(data), PretrainDataset(data), dict(learning_rate=1e-3, lr=2e-3))


def test_pretrainer_pretrain_step_returns_the_loss_dict(data, tmp_path):
    pt = _pretrainer(data, tmp_path, language_weight=0.5, alignment_weight=0.25)
    losses = pt.pretrain_step(pt.dataset.batch(np.arange(16)))
    assert set(LOSS_KEYS) <= set(losses) and all(isinstance(losses[k], float) for k in LOSS_KEYS)
    weighted = losses['vision_loss'] + 0.5 * losses['language_loss'] + losses['action_loss']
    weighted += 0.25 * losses['alignment_loss'] + losses['confidence_loss']
    assert losses['total_loss'] == pytest.approx(weighted, rel=1e-5)
    assert pt.step == 1 and pt.metrics['total_loss'] == [losses['total_loss']]


def test_pretrainer_pretrain_returns_the_final_losses(data, tmp_path):
    pt = _pretrainer(data, tmp_path)
    final = pt.pretrain(2)
    assert set(final) >= {'vision', 'language', 'action', 'alignment', 'total'}
    per_epoch = pt.steps_per_epoch(len(pt.dataset))
    assert pt.step == 2 * per_epoch
    for k in ('vision', 'language', 'action', 'alignment', 'total'):
        assert final[k] == pytest.approx(float(np.mean(pt.metrics[f'{k}_loss'][-per_epoch:])))


def test_pretrainer_metrics_hold_every_step(data, tmp_path):
    pt = _pretrainer(data, tmp_path)
    for i in range(3):
        pt.pretrain_step(pt.dataset.batch(np.arange(16 * i, 16 * i + 16)))
    keys = ('vision_loss', 'language_loss', 'action_loss', 'alignment_loss', 'total_loss', 'learning_rate')
    assert all(len(pt.metrics[k]) == 3 for k in keys)
    assert pt.metrics['learning_rate'][0] < pt.metrics['learning_rate'][2] <= pt.config.lr  # the warmup


# --- ImitationLearningDataset -----------------------------------------------------------------------------------------


def _ild(arg):
    from vla_nb.imitation import ImitationLearningDataset

    return ImitationLearningDataset(arg)


def test_imitation_dataset_constructor_reads_recorded_demonstrations(data):
    ds = _ild(data.root)
    assert ds.dataset.root == data.root and len(_ild(data)) == len(ds)
    with pytest.raises(ValueError, match='recorded episodes'):
        _ild([dict(image=np.zeros((48, 48, 3), np.uint8), command='pick up the red cup', action=np.zeros(7))])


def test_imitation_dataset_len_counts_frames(data):
    assert len(_ild(data)) == data.num_frames == sum(e['length'] for e in data.episodes)


def test_imitation_dataset_item_is_image_command_action(data):
    ds, ep = _ild(data), data.load_episode(1)
    i = int(data.starts[1]) + 3
    item = ds[i]
    assert item['command'] == data.episodes[1]['command']
    assert item['image'].dtype == torch.float32 and item['image'].shape == (3, 48, 48)
    torch.testing.assert_close(item['image'], torch.from_numpy(ep[IMAGE][3]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(item['action'], torch.from_numpy(ep[ACTION][3]))
    torch.testing.assert_close(item['proprio'], torch.from_numpy(ep[PROPRIO][3]))
    torch.testing.assert_close(ds[-1]['action'], torch.from_numpy(data.load_episode(len(data) - 1)[ACTION][-1]))
    with pytest.raises(IndexError):
        ds[len(ds)]


# --- VLAImitationLearner ----------------------------------------------------------------------------------------------


def _learner(data, tmp, **kw):
    cfg = ImitationConfig(batch_size=16, warmup_steps=2, eval_every=0, eval_episodes=1, out_dir=str(tmp / 'il'), **kw)
    return VLAImitationLearner(_net(data), data, cfg)


def test_imitation_learner_constructor_takes_the_familiar_config(data, in_tmp):
    cfg = SimpleNamespace(il_learning_rate=5e-4, weight_decay=1e-3, batch_size=16)
    learner = VLAImitationLearner(_net(data), _ild(data), cfg)
    c = learner.config
    assert isinstance(c, ImitationConfig) and (c.lr, c.weight_decay, c.batch_size) == (5e-4, 1e-3, 16)
    assert learner.dataset.root == data.root
    with pytest.raises(ValueError, match=r"unknown ImitationConfig key\(s\) \['learning_rate'\]"):
        VLAImitationLearner(_net(data), data, SimpleNamespace(learning_rate=1e-3))


def test_imitation_learner_step_returns_a_float(data, tmp_path):
    learner = _learner(data, tmp_path)
    loss = learner.imitation_learning_step(learner.train_data.batch(np.arange(16)))
    assert isinstance(loss, float) and loss > 0
    assert learner.step == 1 and learner.history['train_loss'] == [loss]


def test_imitation_learner_train_returns_the_epoch_losses(data, tmp_path):
    learner = _learner(data, tmp_path)
    losses = learner.train_imitation(2)
    per_epoch = learner.steps_per_epoch(len(learner.train_data))
    steps = learner.history['train_loss']
    assert isinstance(losses, list) and len(losses) == 2 and losses == learner.imitation_losses
    assert losses == pytest.approx([np.mean(steps[:per_epoch]), np.mean(steps[per_epoch:])])


# --- SyntheticDataGenerator -------------------------------------------------------------------------------------------


def _gen(root, n=4):
    return SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=n, image_size=48, seed=7))


def test_generator_constructor_takes_the_familiar_config(in_tmp):
    g = SyntheticDataGenerator(SimpleNamespace(num_scenes=4, image_height=48, image_width=48, num_workers=1))
    assert isinstance(g.config, DataConfig)
    assert (g.config.num_episodes, g.config.image_size, g.config.workers) == (4, 48, 1)
    with pytest.raises(ValueError, match='image_height=48 and image_width=64 both set `image_size`'):
        SyntheticDataGenerator(SimpleNamespace(num_scenes=4, image_height=48, image_width=64))


def test_generator_generate_scenes_are_the_recorded_scenes(tmp_path):
    g = _gen(tmp_path / 'd')
    scenes = g.generate_scenes()
    assert len(scenes) == 4 and scenes == _gen(tmp_path / 'd').generate_scenes()
    assert [s['task']['family'] for s in scenes] == list(sim.TASK_FAMILIES)
    g.generate_dataset(progress_bar=False)
    ds = EpisodeDataset(tmp_path / 'd')
    recorded = {e['episode_index']: e['meta']['scene'] for e in ds.episodes + ds.failures}
    assert [{k: v for k, v in s.items() if k != 'id'} for s in scenes] == [recorded[i] for i in range(4)]


def test_generator_generate_objects_is_the_catalogue(tmp_path):
    objs = _gen(tmp_path).generate_objects()
    assert [o['name'] for o in objs] == list(sim.OBJECTS)
    assert [o['shape'] for o in objs] == ['cylinder', 'cube', 'sphere', 'cylinder', 'box']


def test_generator_generate_lighting_conditions(tmp_path):
    g = _gen(tmp_path)
    a, b = g.generate_lighting_conditions(), g.generate_lighting_conditions()
    for L in (a, b):
        assert 0.5 <= L['intensity'] <= 2.0 and 3000 <= L['temperature'] <= 6500 and 0.5 <= L['direction'][2] <= 1.0
    assert a != b and a == _gen(tmp_path).generate_lighting_conditions()  # random, and seeded by the config


def test_generator_generate_synthetic_sample_is_a_labelled_frame(tmp_path):
    g = _gen(tmp_path)
    s = g.generate_synthetic_sample()
    g.close()
    assert s['image'].shape == (48, 48, 3) and s['image'].dtype == np.uint8 and s['image'].std() > 5
    task = sim.parse_command(s['command'])
    assert dict(family=task.family, obj=task.obj, loc=task.loc) == s['metadata']['task']
    assert s['action'].shape == (7,) and np.abs(s['action']).max() <= 1 and np.abs(s['action'][:3]).max() > 0
    assert s['metadata']['scene']['task'] == s['metadata']['task']


def test_generator_render_scene(tmp_path):
    g = _gen(tmp_path)
    a, b = g.render_scene(), g.render_scene()
    g.close()
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and a.std() > 5 and not np.array_equal(a, b)


def test_generator_generate_command_respects_the_split(tmp_path):
    g = _gen(tmp_path)
    tasks = [sim.parse_command(g.generate_command()) for _ in range(60)]
    assert {t.family for t in tasks} == set(sim.TASK_FAMILIES)
    held = set(g.config.heldout_pairs)
    assert not [t for t in tasks if t.family == 'place' and (t.obj, t.loc) in held]


def test_generator_generate_dataset_records_n_episodes(tmp_path):
    rep = _gen(tmp_path / 'd', n=8).generate_dataset(4, progress_bar=False)
    ds = EpisodeDataset(tmp_path / 'd')
    assert rep['episodes'] + rep['expert_failures'] == 4 == len(ds) + len(ds.failures)
    assert rep['frames'] == ds.num_frames > 0


# --- RealDataCollector (ROS 2 replaced by a fake rclpy: the collector's own logic runs) -------------------------------


class FakeNode:
    def __init__(self, name):
        self.subs, self.timers, self.now, self.destroyed = {}, [], 0, False

    def create_subscription(self, typ, topic, cb, qos):
        self.subs[topic] = (typ, cb)

    def create_timer(self, period, cb):
        self.timers.append((period, cb))

    def get_clock(self):
        return SimpleNamespace(now=lambda: SimpleNamespace(nanoseconds=self.now))

    def get_logger(self):
        return SimpleNamespace(info=lambda m: None, error=lambda m: None)

    def destroy_node(self):
        self.destroyed = True


@pytest.fixture
def fake_ros(monkeypatch):
    names = ('rclpy', 'rclpy.node', 'sensor_msgs', 'sensor_msgs.msg', 'std_msgs', 'std_msgs.msg')
    mods = {n: types.ModuleType(n) for n in names}
    mods['rclpy.node'].Node = FakeNode
    calls = []
    mods['rclpy'].init = lambda args=None: calls.append('init')
    mods['rclpy'].shutdown = lambda: calls.append('shutdown')

    def spin(node):
        calls.append('spin')
        raise KeyboardInterrupt

    mods['rclpy'].spin = spin
    for n in ('Image', 'JointState'):
        setattr(mods['sensor_msgs.msg'], n, n)
    for n in ('String', 'Float32MultiArray'):
        setattr(mods['std_msgs.msg'], n, n)
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return calls


JOINTS = tuple(f'panda_joint{i}' for i in range(1, 8))


def _drive(col, ticks=20, command='pick up the red cup'):
    "Publish `ticks` ticks of camera, joints and command at 10 Hz through the chapter's callbacks, then go idle."
    rng = np.random.default_rng(0)
    for k in range(ticks + 25):
        t = k * 10**8
        col.node.now = t + 5 * 10**6
        q = 0.1 * np.sin(0.3 * k + np.arange(7))
        col.image_callback(ros.image_msg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), t, 'rgb8'))
        col.joint_state_callback(ros.joint_state_msg(JOINTS, q, None, t))
        col.command_callback(ros.string_msg(command if k < ticks else ''))
        col.node.now = t + 9 * 10**7
        col.collect_data_point()


def test_collector_constructor(fake_ros, in_tmp):
    col = ros.RealDataCollector()
    assert col.node is not None and set(col.node.subs) == {'/camera/image_raw', '/joint_states', '/command_log'}
    assert str(col.writer.root).endswith('runs/real_data')


def test_collector_image_callback(fake_ros, tmp_path):
    col = ros.RealDataCollector(tmp_path / 'r', collection_rate=10)
    col.image_callback(ros.image_msg(np.zeros((64, 64, 3), np.uint8), 0, 'rgb8'))
    assert col.sync.latest['image'][0] == col.node.now


def test_collector_joint_state_callback(fake_ros, tmp_path):
    col = ros.RealDataCollector(tmp_path / 'r', collection_rate=10)
    col.joint_state_callback(ros.joint_state_msg(JOINTS, np.arange(7) / 10, None, 0))
    names, pos, _ = col.sync.latest['joints'][1]
    assert tuple(names) == JOINTS and np.allclose(pos, np.arange(7) / 10)


def test_collector_command_callback_reads_json_commands(fake_ros, tmp_path):
    col = ros.RealDataCollector(tmp_path / 'r', collection_rate=10)
    col.command_callback(ros.string_msg('{"command": "find the book"}'))
    assert ros.command_text(col.sync.latest['command'][1]) == 'find the book'


def test_collector_collect_data_point_writes_an_episode(fake_ros, tmp_path):
    col = ros.RealDataCollector(tmp_path / 'r', collection_rate=10)
    _drive(col)
    ds = col.writer.finalize()
    assert len(ds) == 1 and ds.episodes[0]['command'] == 'pick up the red cup'
    assert 15 <= ds.episodes[0]['length'] <= 20


def test_collector_save_data_batch(fake_ros, tmp_path):
    col = ros.RealDataCollector(tmp_path / 'r', collection_rate=10)
    _drive(col)
    col.save_data_batch()
    assert len(EpisodeDataset(tmp_path / 'r')) == 1 and (tmp_path / 'r/meta/stats.json').exists()


def test_collector_main(fake_ros, in_tmp):
    ros.main()
    assert fake_ros == ['init', 'spin', 'shutdown']


# --- OptimizedVLAInference -------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def policy():
    tok = CommandTokenizer.build(command_corpus())
    seed_everything(0)
    return VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok)


@pytest.fixture(scope='module')
def art(policy, tmp_path_factory):
    calib = calibration_observations(12, seed=0)
    return export_artifact(policy, tmp_path_factory.mktemp('art') / 'a', DeployConfig(calib_frames=12), calib=calib)


@pytest.fixture(scope='module')
def obs():
    env = sim.TabletopEnv()
    o, _ = env.reset(seed=3)
    env.close()
    return o


def test_runtime_constructor_takes_a_device(art):
    rt = OptimizedVLAInference(art, device='cpu', warmup=1)
    assert rt.device == torch.device('cpu') and rt.backend == 'ort_fp32'
    assert OptimizedVLAInference(art, 'eager', device='auto', warmup=0).device.type == (
        'cuda' if torch.cuda.is_available() else 'cpu'
    )
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA is not available'):
            OptimizedVLAInference(art, device='cuda')


def test_runtime_get_example_inputs_trace_the_graph(art, policy):
    rt = OptimizedVLAInference(art, warmup=0)
    x = rt.get_example_inputs()
    assert [tuple(t.shape) for t in x] == [(1, 3, 48, 48), (1, policy.net.cfg.max_tokens), (1, 15)]
    assert parity(policy.net, dict(ort=rt.session), B=1)['ort'] < 1e-4
    got = rt.session.run(None, dict(zip(('image', 'token_ids', 'proprio'), (t.numpy() for t in x))))
    with torch.inference_mode():
        want = policy.net.eval()(*x)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4)


def test_runtime_inference_of_a_frame_and_a_command(art, obs):
    rt = OptimizedVLAInference(art, warmup=1)
    out = rt.inference(obs['image'], obs['command'])
    assert set(out) == {'result', 'inference_time', 'stats'}
    mean_state = dict(obs, proprio=rt.pre.norm.mean[PROPRIO])
    np.testing.assert_allclose(out['result']['actions'], rt.infer(mean_state)['actions'], atol=1e-6)
    with_state = rt.inference(obs['image'], obs['command'], proprio=obs['proprio'])
    np.testing.assert_allclose(with_state['result']['actions'], rt.infer(obs)['actions'], atol=1e-6)
    s = with_state['stats']
    assert s['total_calls'] == 3 and s['min_time'] <= with_state['inference_time'] <= s['max_time']
    assert s['avg_time'] == pytest.approx(s['total_time'] / 3)
    assert rt.get_performance_metrics()['mean_proprio_calls'] == 1
    with pytest.raises(ValueError, match='command'):
        rt.inference(obs['image'], None)


def test_runtime_get_performance_metrics_has_avg_time_ms(art, obs):
    rt = OptimizedVLAInference(art, warmup=2)
    assert rt.get_performance_metrics()['avg_time_ms'] == 0.0 and rt.get_performance_metrics()['fps'] == 0.0
    times = [rt.inference(obs['image'], obs['command'], proprio=obs['proprio'])['inference_time'] for _ in range(5)]
    m = rt.get_performance_metrics()
    assert m['total_calls'] == 5 and m['avg_time_ms'] == pytest.approx(1000 * np.mean(times), rel=1e-6)
    assert m['fps'] == pytest.approx(1000 / m['avg_time_ms'], rel=0.01)


# --- EdgeVLADeployer -------------------------------------------------------------------------------------------------


def test_edge_constructor_use_quantized(art):
    assert EdgeVLADeployer(art, use_quantized=True).runtime.backend == 'ort_int8'
    assert EdgeVLADeployer(art, use_quantized=False).runtime.backend == 'ort_fp32'


def test_edge_start_processing_thread(art):
    edge = EdgeVLADeployer(art)
    edge.start_processing_thread()
    try:
        assert edge._thread.is_alive()
    finally:
        edge.stop()


def test_edge_stop_joins_the_thread(art):
    edge = EdgeVLADeployer(art).start()
    thread = edge._thread
    edge.stop()
    assert edge._thread is None and not thread.is_alive()


def test_edge_submit_input_takes_a_frame_and_a_command(art, obs):
    edge = EdgeVLADeployer(art).start()
    try:
        assert edge.submit_input(obs['image'], obs['command']) is True
        res = edge.get_result(timeout=5)
        want = edge.runtime.infer(dict(obs, proprio=edge.runtime.pre.norm.mean[PROPRIO]))['actions']
        np.testing.assert_allclose(res['actions'], want, atol=1e-6)
        with pytest.raises(ValueError, match='unknown word'):
            edge.submit_input(obs['image'], 'xyzzy the cup')
    finally:
        edge.stop()
    edge._thread = SimpleNamespace(is_alive=lambda: True)  # a thread that never takes requests: the queue fills
    oks = [
        edge.submit_input(obs['image'], obs['command'], proprio=obs['proprio']) for _ in range(edge.cfg.queue_size + 2)
    ]
    assert oks == [True] * edge.cfg.queue_size + [False, False] and edge.dropped == 2
    edge._thread = None


def test_edge_get_result_waits_by_default(art, obs):
    edge = EdgeVLADeployer(art).start()
    try:
        edge.submit(obs)
        res = edge.get_result()  # waits up to 1 s by default
        assert res is not None and res['error'] is None
        np.testing.assert_allclose(res['actions'], edge.runtime.infer(obs)['actions'], atol=1e-6)
        t = time.perf_counter()
        assert edge.get_result(timeout=0.3) is None and time.perf_counter() - t >= 0.25
    finally:
        edge.stop()


def test_edge_process_input(art, obs):
    edge = EdgeVLADeployer(art)
    out = edge.process_input(dict(image=obs['image'], command=obs['command'], proprio=obs['proprio']))
    np.testing.assert_allclose(out['actions'], edge.runtime.infer(obs)['actions'], atol=1e-6)
    assert 0 <= out['confidence'] <= 1


def test_edge_preprocess_image(art, obs):
    edge = EdgeVLADeployer(art)
    x = edge.preprocess_image(obs['image'])
    assert x.shape == (3, 48, 48) and x.dtype == np.float32
    np.testing.assert_allclose(x, edge.runtime.pre(obs)['image'][0], atol=1e-6)


def test_edge_preprocess_command(art, obs):
    edge = EdgeVLADeployer(art)
    ids = edge.preprocess_command(obs['command'])
    assert ids.dtype == np.int64 and ids.tolist() == edge.runtime.pre.tokenizer.encode(obs['command'])[0].tolist()
    assert ids[0] > 0 and ids[-1] == 0


# --- HardwareOptimizer -----------------------------------------------------------------------------------------------


def test_hardware_optimize_for_cpu_takes_a_model(policy):
    sess, report = HardwareOptimizer.optimize_for_cpu(policy.net, calls=5)
    assert report['best'] in report['latency_ms']
    assert parity(policy.net, dict(best=sess))['best'] < 1e-4


def test_hardware_optimize_for_mobile_takes_a_model(policy):
    sess, path = HardwareOptimizer.optimize_for_mobile(policy.net)
    assert path.suffix == '.ort' and path.exists()
    assert parity(policy.net, dict(mobile=sess))['mobile'] < 1e-4


def test_hardware_apply_model_compression_takes_a_model(policy):
    rep = HardwareOptimizer.apply_model_compression(policy.net, calls=5)
    assert set(rep['variants']) == {'fp32', 'pruned_fp32', 'int8_dynamic'}
    assert rep['pruning']['amount'] == 0.5 and 0.5 <= rep['pruning']['weight_sparsity'] < 0.6
    assert rep['variants']['fp32']['max_abs_diff'] == 0.0
    assert rep['variants']['int8_dynamic']['size_mb'] < rep['variants']['fp32']['size_mb']


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the error on a machine without CUDA')
def test_hardware_optimize_for_jetson_says_what_it_needs(policy):
    with pytest.raises(RuntimeError, match='needs a CUDA device'):
        HardwareOptimizer.optimize_for_jetson(policy.net)
