"Contracts of the serving chapter (vla_nb.serving): wire checks, chunk merging, remote/local parity, watchdog, batching, faults, bench."
import json
import numpy as np
import pytest
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.data import Normalizer
from vla_nb.language import default_tokenizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats
from vla_nb.deployment import DeployConfig, OptimizedVLAInference, export_artifact, load_artifact
from vla_nb.evaluation import env_for
from vla_nb.serving import (AGGREGATES, ClientConfig, DelayProxy, PolicyClient, PolicyServer, ServeConfig, artifact_sha256,
                            bench_serve, check_request, fault_suite, load_test, merge_chunk, pack_array, request_spec,
                            serve_main, server_health, unpack_array)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


@pytest.fixture(scope='module')
def policy():
    tok = default_tokenizer(); seed_everything(0)
    return VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), Normalizer(bounds_stats()), tok, n_action_steps=4)


@pytest.fixture(scope='module')
def art(policy, tmp_path_factory):
    return export_artifact(policy, tmp_path_factory.mktemp('serve')/'artifact', DeployConfig(int8=False))


@pytest.fixture(scope='module')
def server(art):
    with PolicyServer(art, ServeConfig(port=0, warmup=1)) as srv:
        yield srv


@pytest.fixture(scope='module')
def obs(policy):
    env = env_for(policy); o, _ = env.reset(seed=3); env.close(); return o


def test_wire_checks(art):
    x = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(unpack_array(pack_array(x), 'x', 'int64', (3, 4)), x)
    with pytest.raises(ValueError, match='only numeric'): pack_array(np.array(['a']))
    _, meta = load_artifact(art)
    spec, V = request_spec(meta), meta['config']['vocab_size']
    assert spec == {'image': ('float32', [1, 3, 48, 48]), 'token_ids': ('int64', [1, 16]), 'proprio': ('float32', [1, 15])}
    ok = {k: pack_array(np.zeros(s, t)) for k, (t, s) in spec.items()}
    assert set(check_request(ok, spec, V)) == set(spec)
    bad_ids = np.zeros(spec['token_ids'][1], np.int64); bad_ids[0, 3] = V
    nan = np.zeros(spec['proprio'][1], np.float32); nan[0, 2] = np.inf
    for inputs, msg in [({**ok, 'image': pack_array(np.zeros(spec['image'][1], np.float64))}, "image: dtype 'float64'"),
                        ({**ok, 'proprio': pack_array(np.zeros((1, 14), np.float32))}, r'proprio: shape \[1, 14\]'),
                        ({**ok, 'token_ids': pack_array(bad_ids)}, rf'ids must lie in \[0, {V}\)'),
                        ({**ok, 'proprio': pack_array(nan)}, 'proprio: 1 values are NaN or inf'),
                        ({**ok, 'image': {**ok['image'], 'data': ok['image']['data'] + b'x'}}, 'needs 27648'),
                        ({k: v for k, v in ok.items() if k != 'image'}, 'do not match'),
                        ({**ok, 'image': {**ok['image'], 'extra': 1}}, 'exactly')]:
        with pytest.raises(ValueError, match=msg): check_request(inputs, spec, V)


def test_configs():
    with pytest.raises(ValueError, match='shared-secret token'): ServeConfig(host='0.0.0.0')
    with pytest.raises(ValueError, match='at least 16'): ServeConfig(token='abc')
    assert ServeConfig(host='::1').token is None                     # loopback needs no token
    with pytest.raises(ValueError, match='aggregate'): ClientConfig(aggregate='median')
    with pytest.raises(ValueError, match='threshold'): ClientConfig(threshold=1.5)


def test_merge_chunk():
    q = [(t, np.full(3, 1.0, np.float32)) for t in (5, 6, 7)]
    from collections import deque
    new = np.zeros((6, 3), np.float32)                                # observed at tick 4, arrives at tick 5
    m = merge_chunk(deque(q), new, 4, 5, AGGREGATES['weighted_average'])
    assert [t for t, _ in m] == [5, 6, 7, 8, 9]                       # tick 4 is past: dropped
    np.testing.assert_allclose([a[0] for _, a in m], [0.3, 0.3, 0.3, 0, 0])
    m = merge_chunk(deque(q), new, 4, 5, AGGREGATES['latest_only'])
    np.testing.assert_allclose([a[0] for _, a in m], [0] * 5)
    assert [t for t, _ in merge_chunk(deque(q), new[:2], 0, 5, AGGREGATES['latest_only'])] == [5, 6, 7]  # all stale: kept


def test_sync_client_matches_local(server, art, policy, obs):
    assert server_health(server.url)['artifact_sha256'] == artifact_sha256(art)
    local = OptimizedVLAInference(art, 'ort_fp32', threads=1, warmup=1)
    with PolicyClient(server.url, ClientConfig(threshold=0.0, realtime=False, control_hz=1.0)) as c:
        np.testing.assert_allclose(c.predict_action_chunk(obs), local.predict_action_chunk(obs), atol=1e-6)
        env = env_for(policy, max_steps=10)
        a, b = sim.rollout(env, local, seed=7), sim.rollout(env, c, seed=7)
        env.close()
        m = c.get_performance_metrics()
    np.testing.assert_allclose(b['actions'], a['actions'], atol=1e-6)
    assert c.n_action_steps == 4 and m['requests'] == 1 + 3 and m['deadline_misses'] == 0 and m['errors'] == 0  # 10 steps / 4
    with pytest.raises(RuntimeError, match='expected 000000000000'):
        PolicyClient(server.url, ClientConfig(expected_sha256='0' * 64))


@pytest.mark.timing
def test_async_client_holds_and_drops_stale(server, obs):
    "A 150 ms delay against 20 ms ticks: the queue runs dry, the watchdog holds (no motion, gripper kept), stale actions are dropped,\n    and the client still acts (held ticks do not age a chunk)."
    cfg = ClientConfig(threshold=0.5, realtime=True, control_hz=50, request_timeout_s=2.0)
    with DelayProxy(server.port, 150, 10, seed=0) as px, PolicyClient(px.url, cfg) as c:
        acts = [c.select_action(obs) for _ in range(40)]
        m = c.get_performance_metrics()
    holds = [a for a in acts if not a[:-1].any()]
    assert m['deadline_misses'] == len(holds) > 0 and m['replies'] >= 2
    assert m['rtt']['p50'] >= 140                                      # the delay is really there
    assert m['stale_dropped'] > 0                                     # chunks arrive ticks after their observation
    moving = [bool(a[:-1].any()) for a in acts]
    i = next(i for i in range(1, len(acts)) if moving[i - 1] and not moving[i])   # a hold right after a real action
    assert acts[i][-1] == acts[i - 1][-1] != 0                        # gripper command unchanged while holding


@pytest.mark.timing
def test_batching(art):
    with PolicyServer(art, ServeConfig(port=0, max_batch=8, warmup=1)) as on, PolicyServer(art, ServeConfig(port=0, max_batch=1, warmup=1)) as off:
        r_on, r_off = load_test(on.url, 6, 0.6, seed=1), load_test(off.url, 6, 0.6, seed=1)
        h = server_health(on.url)
    assert r_on['errors'] == r_off['errors'] == 0 and r_on['requests'] > 20 and r_off['requests'] > 20
    assert r_on['mean_batch'] > 1.2 and r_off['mean_batch'] == 1.0    # several clients' requests shared a model call
    assert max(int(k) for k in h['batch_sizes']) <= 8
    assert r_on['latency_ms']['p50'] <= r_on['latency_ms']['p99']


def test_faults(art, obs):
    f = fault_suite(art, obs, restart=True)
    assert {k: v['survived'] for k, v in f.items()} == dict.fromkeys(
        ['client_killed', 'malformed', 'wrong_dtype_shape', 'oversized', 'slow_client', 'artifact_replaced', 'wrong_token',
         'server_restart'], True), f
    assert f['wrong_token']['codes'] == [401, 401] and f['wrong_token']['rejected'] == 3
    assert f['oversized']['close_code'] == 1009
    assert f['artifact_replaced']['detected'] and f['slow_client']['dropped_by_server']
    assert 'NaN' in f['wrong_dtype_shape']['errors']['proprio'] and 'text frame' in f['malformed']['errors']['text frame']
    assert f['server_restart']['held_ticks'] > 0 and f['server_restart']['reconnects'] >= 1
    assert all(v['bystander']['sent'] == v['bystander']['answered'] > 0 for k, v in f.items() if k != 'server_restart')


def test_serve_main_errors(tmp_path, capsys):
    assert serve_main([str(tmp_path / 'missing'), '--port', '0']) == 2
    assert 'not found' in capsys.readouterr().err
    assert serve_main([str(tmp_path), '--host', '0.0.0.0']) == 2
    assert 'shared-secret token' in capsys.readouterr().err


@pytest.mark.slow
def test_bench_serve(policy, tmp_path):
    policy.save(tmp_path / 'p.safetensors')
    res = bench_serve(tmp_path / 'p.safetensors', tmp_path / 'out', episodes_per_family=1, duration_s=0.3, clients=(1, 4),
                      max_steps=5)
    json.dumps(res)                                                   # JSON-ready
    assert set(res['latency_ms']) == {'on', 'off'} and set(res['latency_ms']['on']) == {'1', '4'}
    assert all(set(v) == {'p50', 'p90', 'p99'} for m in res['latency_ms'].values() for v in m.values())
    assert all(e == 0 for m in res['errors'].values() for e in m.values())
    assert res['throughput_rps']['on']['4'] > 0 and res['mean_batch']['off']['4'] == 1.0
    assert {'lo', 'hi', 'rate'} <= set(res['success_local']) and 'async_weighted_delay' in res['success_remote']
    assert all(res['faults'].values()) and res['rejected_unauthenticated'] == 3
    assert set(res['targets']) == {'p99_4_clients_le_20ms', 'batching_ge_1_5x_at_max_clients', 'all_faults_survived',
                                   'remote_within_local_ci'}


def test_message_frames_and_hosts(tmp_path):
    from vla_nb.serving import file_sha256, is_loopback, packb, unpackb
    msg = {'type': 'infer', 'id': 3, 'inputs': {'proprio': pack_array(np.arange(3, dtype=np.float32))}}
    back = unpackb(packb(msg))
    assert back == msg and unpack_array(back['inputs']['proprio'], 'proprio', 'float32', [3]).tolist() == [0, 1, 2]
    for bad, m in (('{"type": "infer"}', 'text frame'), (b'\xc1', 'malformed msgpack'), (packb([1, 2]), "map with a string 'type'"),
                   (packb({'type': 3}), "string 'type'"), (packb({1: 'x', 'type': 'a'}), 'malformed msgpack')):
        with pytest.raises(ValueError, match=m): unpackb(bad)
    assert [is_loopback(h) for h in ('localhost', '127.0.0.1', '127.8.0.2', '::1', '0.0.0.0', '10.0.0.1', 'example.org', '::')] == \
           [True, True, True, True, False, False, False, False]
    p = tmp_path/'f.bin'; p.write_bytes(b'abc' * 700_000)                  # read in blocks: larger than one block
    import hashlib
    assert file_sha256(p) == hashlib.sha256(b'abc' * 700_000).hexdigest() and file_sha256(tmp_path/'missing') is None


def test_faults_sentence_artifact(tmp_path):
    "The shipped sentence-encoder policy: its input is an embedding, not token ids, and its hello carries a large vocab."
    from vla_nb.model import load_pretrained
    art = export_artifact(load_pretrained('tabletop'), tmp_path/'artifact', DeployConfig(int8=False))
    env = env_for(load_pretrained('tabletop')); o, _ = env.reset(seed=3); env.close()
    f = fault_suite(art, o, restart=False)
    assert all(v['survived'] for v in f.values()), {k: v for k, v in f.items() if not v['survived']}
    assert 'NaN or inf' in f['wrong_dtype_shape']['errors']['text_embedding']
    assert 'token_ids' not in f['wrong_dtype_shape']['errors']
    assert f['slow_client']['dropped_by_server']
