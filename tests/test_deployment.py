"Contracts of the deployment chapter (vla_nb.deployment): export parity, artifact integrity, int8 recipe, runtime, edge loop, bad input."
import json, shutil, threading, time
import numpy as np
import onnx
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import Normalizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
from vla_nb.deployment import (DeployConfig, EdgeConfig, Preprocessor, HardwareOptimizer, OptimizedVLAInference, EdgeVLADeployer,
                               export_torchscript, export_onnx, export_program, export_artifact, load_artifact, parity, ort_session,
                               quantize_int8, prune_l1, calibration_observations, edge_rollout, latency_stats, bench_deploy, deploy_summary,
                               example_inputs, check_onnx_io, BACKENDS, RUNTIME_THREADS)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


@pytest.fixture(scope='module')
def policy():
    tok = CommandTokenizer.build(command_corpus()); seed_everything(0)
    return VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok)


@pytest.fixture(scope='module')
def calib(): return calibration_observations(12, seed=0)


@pytest.fixture(scope='module')
def art(policy, calib, tmp_path_factory):
    return export_artifact(policy, tmp_path_factory.mktemp('dep')/'artifact', DeployConfig(calib_frames=12), calib=calib)


@pytest.fixture(scope='module')
def obs():
    env = sim.TabletopEnv(); o, _ = env.reset(seed=3); env.close(); return o


def test_config_validation():
    with pytest.raises(ValueError, match='opset'): DeployConfig(opset=11)
    with pytest.raises(ValueError, match='execution_mode'): DeployConfig(execution_mode='async')
    with pytest.raises(ValueError, match='refill_at'): EdgeConfig(n_action_steps=4, refill_at=4)
    assert DeployConfig.from_dict(DeployConfig(threads=1).to_dict()) == DeployConfig(threads=1)


def test_export_parity_all_routes(policy, tmp_path):
    net = policy.net
    p = export_onnx(net, tmp_path/'m.onnx')
    m = onnx.load(str(p)); onnx.checker.check_model(m)
    assert m.opset_import[0].version >= 17
    assert [i.name for i in m.graph.input] == ['image', 'token_ids', 'proprio'] and [o.name for o in m.graph.output] == ['actions', 'confidence']
    d = parity(net, dict(torchscript=export_torchscript(net), torch_export=export_program(net).module(), ort=ort_session(p)), B=5)
    assert all(v < 1e-4 for v in d.values()), d                 # batch 5 != traced batch 2: the batch axis is dynamic


def test_export_parity_fine_keypoints(policy, tmp_path):
    seed_everything(1); net = VLANet(ModelConfig(vocab_size=policy.tokenizer.vocab_size, **SMALL, keypoint_level=1)).eval()   # the demo's setting
    d = parity(net, dict(torchscript=export_torchscript(net), ort=ort_session(export_onnx(net, tmp_path/'k1.onnx'))), B=3)
    assert all(v < 1e-4 for v in d.values()), d


def test_artifact_sidecar(art, policy):
    d, meta = load_artifact(art)
    assert {'model_onnx', 'model_int8', 'weights'} <= set(meta['files'])
    for k in ('stats', 'tokenizer', 'action_bounds', 'input_spec', 'output_spec', 'config'): assert k in meta
    assert CommandTokenizer.from_json(meta['tokenizer']).vocab_size == policy.tokenizer.vocab_size
    assert meta['input_spec']['image']['shape'] == ['batch', 3, 48, 48]
    assert meta['parity']['ort_fp32'] < 1e-4
    assert not list(art.glob('*.tmp')) and not list(art.glob('*.pt'))   # no temp leftovers, no pickles


def test_artifact_errors(art, tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'): load_artifact(tmp_path/'missing')
    (tmp_path/'file.onnx').write_bytes(b'x')
    with pytest.raises(ValueError, match='not an artifact directory'): load_artifact(tmp_path/'file.onnx')
    bad = shutil.copytree(art, tmp_path/'bad')
    (bad/'deploy.json').write_text('{"kind": "vla')
    with pytest.raises(ValueError, match='corrupt deploy.json'): OptimizedVLAInference(bad)
    meta = json.loads((art/'deploy.json').read_text())
    (bad/'deploy.json').write_text(json.dumps({**meta, 'kind': 'other'}))
    with pytest.raises(ValueError, match='not a vla_nb deployment'): load_artifact(bad)
    shutil.copy(art/'deploy.json', bad/'deploy.json')
    b = (bad/'model.onnx').read_bytes(); (bad/'model.onnx').write_bytes(b[:len(b) // 2])   # truncated model
    with pytest.raises(ValueError, match='sha256'): OptimizedVLAInference(bad)
    (bad/'model.onnx').unlink()
    with pytest.raises(ValueError, match='lacks model.onnx'): load_artifact(bad)
    (bad/'deploy.json').unlink()
    with pytest.raises(ValueError, match='no deploy.json'): load_artifact(bad)


def test_onnx_input_names_mismatch(art, tmp_path):
    bad = shutil.copytree(art, tmp_path/'renamed')
    m = onnx.load(str(bad/'model.onnx'))
    for node in m.graph.node: node.input[:] = ['command' if x == 'token_ids' else x for x in node.input]
    m.graph.input[1].name = 'command'
    onnx.save(m, str(bad/'model.onnx'))
    meta = json.loads((bad/'deploy.json').read_text())            # a consistent hash: only the names are wrong
    import hashlib; meta['files']['model_onnx']['sha256'] = hashlib.sha256((bad/'model.onnx').read_bytes()).hexdigest()
    (bad/'deploy.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ONNX inputs .*command.* do not match"): OptimizedVLAInference(bad, warmup=0)


def test_check_onnx_io(art):
    _, meta = load_artifact(art)
    sess = ort_session(art/'model.onnx')
    assert check_onnx_io(sess, meta) is None                               # the exported graph matches its sidecar
    assert check_onnx_io(sess, {**meta, 'input_spec': {**meta['input_spec'], 'command': {'dtype': 'str'}}}) is None   # text is not a graph input
    spec = dict(meta['input_spec']); spec['wrist_image'] = spec['image']
    with pytest.raises(ValueError, match=r"int8 ONNX inputs \['image', 'token_ids', 'proprio'\] do not match the artifact's input spec "
                                         r"\['image', 'token_ids', 'proprio', 'wrist_image'\]"):
        check_onnx_io(sess, {**meta, 'input_spec': spec}, 'int8')
    with pytest.raises(ValueError, match=r"model ONNX outputs \['actions', 'confidence'\] do not match .* \['actions'\]"):
        check_onnx_io(sess, {**meta, 'output_spec': {'actions': meta['output_spec']['actions']}})
    assert check_onnx_io(sess, {k: v for k, v in meta.items() if k != 'output_spec'}) is None   # older sidecars: the default names


def test_runtime_matches_policy_and_tokenizer(art, policy, obs):
    rt = OptimizedVLAInference(art, 'ort_fp32', warmup=2)
    import cv2
    small = {**obs, 'image': cv2.resize(obs['image'], (48, 48), interpolation=cv2.INTER_AREA)}   # the model is 48 px, the camera 96
    np.testing.assert_allclose(rt.predict_action_chunk(obs), policy.predict_action_chunk(small), atol=1e-4)
    for c in command_corpus()[::37]: np.testing.assert_array_equal(rt.pre.command(c), policy.tokenizer.encode(c)[0])
    chunk = rt.predict_action_chunk(obs); rt.reset()
    acts = [rt.select_action(obs) for _ in range(3)]
    np.testing.assert_allclose(acts, chunk[:3], atol=1e-6); assert len(rt._queue) == 5
    m = rt.get_performance_metrics()
    assert m['total_calls'] == 3 and m['p50'] <= m['p95'] <= m['p99'] and m['fps'] > 0


def test_backends_agree(art, obs):
    chunks = {b: OptimizedVLAInference(art, b, warmup=1).predict_action_chunk(obs) for b in BACKENDS}
    for b in ('torchscript', 'ort_fp32'): np.testing.assert_allclose(chunks[b], chunks['eager'], atol=1e-4)
    assert np.abs(chunks['ort_int8'] - chunks['eager']).max() < 0.1


@pytest.mark.parametrize('change,msg', [
    (lambda o: {**o, 'image': o['image'][..., 0]}, 'shape'), (lambda o: {**o, 'image': np.dstack([o['image'], o['image'][..., :1]])}, '3 RGB channels'),
    (lambda o: {**o, 'image': o['image'].astype(np.float32)}, 'uint8'), (lambda o: {**o, 'image': o['image'].tolist()}, 'uint8'),
    (lambda o: {**o, 'command': '   '}, 'empty'), (lambda o: {**o, 'command': 'pick up the cup ' * 8}, 'limit'),
    (lambda o: {**o, 'command': 'pick up the caf\u00e9 cup'}, "['caf\u00e9']"), (lambda o: {**o, 'command': 3}, 'must be a str'),
    (lambda o: {**o, 'proprio': np.where(np.arange(15) == 4, np.nan, o['proprio'])}, 'NaN at indices [4]'),
    (lambda o: {**o, 'proprio': o['proprio'][:10]}, 'proprio must have shape'), (lambda o: {'image': o['image']}, 'lacks')])
def test_bad_input_then_recovers(art, obs, change, msg):
    rt = OptimizedVLAInference(art, warmup=0)
    ref = rt.infer(obs)['actions']
    with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]')): rt.infer(change(obs))
    np.testing.assert_array_equal(rt.infer(obs)['actions'], ref)              # the next good frame works, unchanged
    assert rt.get_performance_metrics()['total_calls'] == 2                # the refused frame never reached the model


def test_any_frame_size_is_resized(art, obs):
    import cv2
    rt = OptimizedVLAInference(art, warmup=0)
    big = cv2.resize(obs['image'], (640, 480))
    a = rt.predict_action_chunk({**obs, 'image': big})
    b = rt.predict_action_chunk({**obs, 'image': cv2.resize(big, (48, 48), interpolation=cv2.INTER_AREA)})
    np.testing.assert_array_equal(a, b)                                     # an area resize to the model's side, and nothing else
    assert a.shape == (8, 7) and np.all(np.abs(a) <= 1)


def test_int8_recipe(art, policy, calib, tmp_path):
    _, meta = load_artifact(art)
    mixed = onnx.load(str(art/'model_int8.onnx')); ops = {n.op_type for n in mixed.graph.node}
    assert 'ConvInteger' not in ops and 'DequantizeLinear' in ops and ('DynamicQuantizeLinear' in ops or 'MatMulInteger' in ops), ops
    dyn = quantize_int8(art/'model.onnx', tmp_path/'dyn.onnx', [], 'dynamic')
    assert 'ConvInteger' in {n.op_type for n in onnx.load(str(dyn)).graph.node}   # why the mixed recipe exists
    assert meta['files']['model_int8']['bytes'] < 0.7 * meta['files']['model_onnx']['bytes']   # tiny test model: scales and graph overhead weigh more
    with pytest.raises(ValueError, match='calibration'): quantize_int8(art/'model.onnx', tmp_path/'x.onnx', [], 'mixed')


def test_pruning_is_permanent_and_does_not_touch_policy(policy, calib, tmp_path):
    net = VLANet(policy.cfg); net.load_state_dict(policy.net.state_dict())
    s = prune_l1(net, 0.6)
    assert 0.6 <= s['weight_sparsity'] < 0.7 and not any('weight_orig' in k for k in net.state_dict())
    before = {k: v.clone() for k, v in policy.net.state_dict().items()}
    art = export_artifact(policy, tmp_path/'pruned', DeployConfig(prune_amount=0.5, int8=False))
    assert all(torch.equal(v, policy.net.state_dict()[k]) for k, v in before.items())
    assert json.loads((art/'deploy.json').read_text())['pruning']['weight_sparsity'] >= 0.5


def test_hardware_optimizer(policy, art, calib, tmp_path):
    sess, rep = HardwareOptimizer.optimize_for_cpu(art/'model.onnx', threads=1, calls=10)
    lat = rep['latency_ms']
    assert set(lat) == {'disable/t1/sequential', 'basic/t1/sequential', 'all/t1/sequential', 'all/t1/parallel'}
    assert all(v['n'] == 10 for v in lat.values()) and rep['best'] == min(lat, key=lambda k: lat[k]['p50'])   # the fastest, measured
    assert sess.get_session_options().intra_op_num_threads == 1
    assert sess.get_session_options().graph_optimization_level.name == {'disable': 'ORT_DISABLE_ALL', 'basic': 'ORT_ENABLE_BASIC',
                                                                        'all': 'ORT_ENABLE_ALL'}[rep['best'].split('/')[0]]
    mob, path = HardwareOptimizer.optimize_for_mobile(policy.net, tmp_path/'mob')
    assert path.suffix == '.ort' and path.stat().st_size > 0 and parity(policy.net, dict(m=mob))['m'] < 1e-4
    rep = HardwareOptimizer.apply_model_compression(policy.net, [OptimizedVLAInference(art, warmup=0).pre(o) for o in calib[:4]], tmp_path/'c', 0.5, 1, 5)
    v = rep['variants']
    assert v['pruned_fp32']['gzip_mb'] < v['fp32']['gzip_mb'] and v['int8_mixed']['size_mb'] < 0.7 * v['fp32']['size_mb']


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA: the missing-CUDA error cannot occur')
def test_jetson_without_cuda_says_what_is_missing(policy):
    with pytest.raises(RuntimeError, match='needs a CUDA device'): HardwareOptimizer.optimize_for_jetson(policy.net)


def test_jetson_on_gpu(policy):
    if not torch.cuda.is_available(): pytest.skip('needs a CUDA device')
    pytest.importorskip('torch_tensorrt', reason="needs torch-tensorrt: pip install 'vla_nb[gpu]'")
    trt = HardwareOptimizer.optimize_for_jetson(policy.net)
    x = tuple(t.cuda() for t in example_inputs(policy.cfg, 1))
    with torch.no_grad(): ref = policy.net.cuda()(*x)[0]; out = trt(*x)[0]
    policy.net.cpu()
    assert (out.float() - ref).abs().max() < 1e-2                 # fp16


def test_edge_errors_overflow_and_stop(art, obs):
    edge = EdgeVLADeployer(art, EdgeConfig(queue_size=2, warmup=0))
    with pytest.raises(RuntimeError, match='start'): edge.submit(obs)
    edge.start()
    with pytest.raises(ValueError, match='proprio contains NaN'): edge.submit({**obs, 'proprio': np.full(15, np.nan)})
    orig = edge.runtime.run_feed
    def flaky(feed, t0=None):                                      # a failure inside the model, on the thread
        if feed['proprio'][0, 0] > 100: raise RuntimeError('simulated kernel failure')
        return orig(feed, t0)
    edge.runtime.run_feed = flaky
    big = {**obs, 'proprio': np.full(15, 1e6, np.float32)}
    fids = [edge.submit(o) for o in (obs, big)]
    res = [edge.get_result(timeout=5) for _ in fids]
    assert [r['frame'] for r in res] == fids and res[0]['error'] is None and 'simulated kernel failure' in res[1]['error']
    np.testing.assert_array_equal(res[0]['actions'], edge.runtime.infer(obs)['actions'])   # the good frame's own result
    assert edge.errors == 1 and edge.processed == 2
    np.testing.assert_array_equal(edge.runtime.infer(obs)['actions'], res[0]['actions'])   # still alive
    entered = threading.Event()
    def blocked(feed, t0=None):                                    # an inference that lasts until stop() is called
        entered.set(); edge._stop.wait(30); return orig(feed, t0)
    edge.runtime.run_feed = blocked
    edge.submit(obs); assert entered.wait(30)                      # one frame in flight ...
    for _ in range(11): edge.submit(obs)                           # ... and more than the queue holds: the oldest are dropped
    assert edge.dropped == 9 and edge.inq.qsize() == 2
    edge.stop()                                                    # joins after the frame in flight, without draining the queue
    assert edge._thread is None and edge.processed == 3 and edge.inq.qsize() == 2


def test_edge_deadline_miss_holds_position(art, obs):
    edge = EdgeVLADeployer(art, EdgeConfig(control_hz=50, warmup=0, realtime=False))
    orig, go = edge.runtime.run_feed, threading.Event()
    ref = orig(edge.runtime.pre(obs))['actions']
    edge.runtime.run_feed = lambda f, t0=None: (go.wait(30), orig(f, t0))[1]   # inference held past the 20 ms deadline
    try:
        edge._last_grip = 0.7
        a = edge.select_action(obs)
        np.testing.assert_array_equal(a[:6], 0); assert a[6] == pytest.approx(0.7) and edge.misses == 1   # hold, gripper kept
        go.set()
        for _ in range(3000):                                      # wait for the late result (no timing assumption)
            if edge.outq.qsize(): break
            time.sleep(0.01)
        b = edge.select_action(obs)                                # the late chunk, shifted by the one tick that passed
        np.testing.assert_allclose(b, ref[1], atol=1e-6); assert edge.misses == 1 and edge.ticks == 2
    finally: edge.stop()


def test_edge_matches_synchronous_policy(art):
    "With refill_at=0 and a generous deadline, the edge loop executes exactly the synchronous runtime's actions."
    env = sim.TabletopEnv(sim.SimConfig(max_steps=12))
    sync = sim.rollout(env, OptimizedVLAInference(art, warmup=0, n_action_steps=4), seed=5)['actions']
    edge = EdgeVLADeployer(art, EdgeConfig(control_hz=0.5, realtime=False, n_action_steps=4, refill_at=0, warmup=0))
    try: asyn = sim.rollout(env, edge, seed=5)['actions']
    finally: edge.stop(); env.close()
    np.testing.assert_allclose(asyn, sync, atol=1e-6); assert edge.misses == 0


@pytest.mark.timing
def test_edge_closed_loop_rate(art):
    cfg = EdgeConfig(control_hz=10, warmup=2)
    env = sim.TabletopEnv(sim.SimConfig(max_steps=15))
    edge = EdgeVLADeployer(art, cfg)
    try: r = edge_rollout(env, edge, seed=1)
    finally: edge.stop(); env.close()
    assert r['steps'] == 15 and r['deadline_misses'] <= 2, r                   # inference keeps up with the ticks ...
    assert 0.7 < r['control_hz'] / cfg.control_hz <= 1.05, r                   # ... paced to the configured rate, never faster
    assert r['inference_p90_ms'] < 1000 / cfg.control_hz, r                    # one inference fits in one period


def test_latency_stats():
    s = latency_stats([0.001] * 90 + [0.01] * 10)
    assert s['p50'] == 1.0 and s['p99'] == pytest.approx(10.0) and s['n'] == 100
    assert latency_stats([])['n'] == 0


@pytest.mark.slow
@pytest.mark.timing
def test_bench_deploy_structure(policy, tmp_path):
    policy.save(tmp_path/'p.safetensors'); threads = torch.get_num_threads()
    r = bench_deploy(tmp_path/'p.safetensors', calls=5, episodes_per_family=0, out_dir=tmp_path/'b', calib_frames=8)
    assert set(r['latency_ms']) == {'t1_b1', 't1_b8', 't2_b1', 't2_b8'}
    for s in r['latency_ms'].values(): assert set(s) == set(BACKENDS) and all(v['n'] == 5 for v in s.values())
    assert r['max_abs_diff']['ort_fp32'] < 1e-4 and r['max_abs_diff']['torchscript'] < 1e-4
    assert r['size_mb']['ort_int8'] < r['size_mb']['ort_fp32'] and r['control_loop_hz'] > 5 and r['gflops_per_sample'] > 0
    assert {'size_ok', 'speed_ok', 'int8_kept'} <= set(r['int8_gates']) and torch.get_num_threads() == threads
    assert 0.85 < r['control_loop_hz'] / 10 <= 1.05 and r['control_loop_hz_unpaced'] > r['control_loop_hz']   # paced to 10 Hz
    rt = OptimizedVLAInference(r['artifact'], 'auto', warmup=0)   # bench wrote its int8 verdict into the sidecar
    assert rt.backend == r['recommended_backend'] == ('ort_int8' if r['int8_gates']['int8_kept'] else 'ort_fp32')
    assert r['int8_gates']['success_ok'] is False and not r['int8_gates']['int8_kept']   # no closed-loop check, no int8
    summ = deploy_summary(r)
    assert summ['table'].count('\n') == 1 + len(BACKENDS) and all(f'| {b} |' in summ['table'] for b in BACKENDS)
    json.dumps(r, default=str)


def test_edge_session_stops_the_thread_even_after_an_error(art, obs):
    from vla_nb.deployment import edge_session
    with pytest.raises(KeyError, match='boom'):
        with edge_session(art, EdgeConfig(warmup=0)) as edge:
            assert edge._thread.is_alive()
            fid = edge.submit(obs); r = edge.get_result(timeout=30)
            assert r['frame'] == fid and r['error'] is None
            raise KeyError('boom')
    assert edge._thread is None and edge.processed == 1
    p50 = lambda b, t: r['latency_ms'][f't{t}_b1'][b]['p50']
    assert r['best_threads'] == {b: min((1, 2), key=lambda t: p50(b, t)) for b in BACKENDS}   # each at its fastest count
    best = r['best_threads']
    assert r['speedup_ort_fp32_vs_eager'] == pytest.approx(p50('eager', best['eager']) / p50('ort_fp32', best['ort_fp32']), abs=0.01)
    assert r['speedup_ort_fp32_vs_eager_by_threads']['t2'] == pytest.approx(p50('eager', 2) / p50('ort_fp32', 2), abs=0.01)
    assert r['int8_gates']['threads'] == r['runtime_threads'] == RUNTIME_THREADS    # int8 is judged where it will run
    assert r['policy_step_p90_ms'] == r['policy_step_ms'][f't{RUNTIME_THREADS}']['ort_fp32']['p90']
    assert {v['n'] for s in r['policy_step_ms'].values() for v in s.values()} == {5}
    assert all(f'| {b} | {best[b]} |' in summ['table'] for b in BACKENDS)


def test_runtime_threads_default(art):
    assert DeployConfig().threads == EdgeConfig().threads == OptimizedVLAInference(art, warmup=0).threads == RUNTIME_THREADS
    assert ort_session(art/'model.onnx').get_session_options().intra_op_num_threads == RUNTIME_THREADS


@pytest.mark.timing
def test_runtime_threads_is_the_faster_policy_step(art, obs):
    "The default thread count's policy-step p90 is no worse than the other count's, measured interleaved in one run."
    rts = {t: OptimizedVLAInference(art, 'ort_fp32', t, warmup=20) for t in (1, 2)}
    for i in range(300):
        for t in ((1, 2) if i % 2 else (2, 1)):
            rts[t].infer(obs)
    p90 = {t: rt.get_performance_metrics()['p90'] for t, rt in rts.items()}
    assert p90[RUNTIME_THREADS] <= 1.25 * p90[3 - RUNTIME_THREADS], p90
