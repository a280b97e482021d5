"""Revisitop ground truth: restricted unpickler, JSON form, validation."""

import json
import os
import pickle

import numpy as np
import pytest

from leap.evaluation import EvaluationError
from leap.evaluation.retrieval import GroundTruth, ground_truth_to_json, load_ground_truth


def _gnd_content():
    # The layout of revisitop's gnd_roxford5k.pkl: names, and per query a bbx and index arrays.
    return {
        "imlist": ["all_souls_000013", "all_souls_000026", "oxford_003410", "radcliffe_camera_000519"],
        "qimlist": ["all_souls_000013", "radcliffe_camera_000519"],
        "gnd": [
            {
                "bbx": [136.5, 34.1, 648.5, 955.7],
                "easy": np.array([0, 1]),
                "hard": np.array([], dtype=np.int64),
                "junk": np.array([2]),
            },
            {
                "bbx": np.array([1.0, 2.0, 30.0, 40.0]),
                "easy": [3],
                "hard": np.array([2, 1], dtype=np.int32),
                "junk": [],
            },
        ],
    }


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os(tmp_path):
    marker = tmp_path / "pwned"
    content = _gnd_content()
    content["gnd"][0]["easy"] = _Evil(marker)
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(EvaluationError, match=r"refusing to unpickle (posix|os|nt)\.system"):
        load_ground_truth(path)
    assert not marker.exists()  # nothing ran
    # Plain pickle would have run it: the test pickle really is malicious.
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "evil", [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load"), ("builtins", "getattr")]
)
def test_restricted_unpickler_refuses_other_globals(tmp_path, evil):
    module, name = evil
    # Protocol 2: GLOBAL opcode naming module.name, then an empty tuple and REDUCE.
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    path = tmp_path / "g.pkl"
    path.write_bytes(payload)
    with pytest.raises(EvaluationError, match=f"refusing to unpickle {module}.{name}"):
        load_ground_truth(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_and_json_give_the_same_ground_truth(tmp_path, protocol):
    pkl = tmp_path / "gnd.pkl"
    pkl.write_bytes(pickle.dumps(_gnd_content(), protocol=protocol))
    gt = load_ground_truth(pkl)
    assert gt.imlist == _gnd_content()["imlist"]
    assert gt.gnd[0]["easy"] == [0, 1] and gt.gnd[0]["hard"] == [] and gt.gnd[0]["junk"] == [2]
    assert gt.gnd[1]["hard"] == [2, 1] and gt.gnd[1]["bbx"] == (1.0, 2.0, 30.0, 40.0)
    assert gt.gnd[0]["bbx"] == pytest.approx((136.5, 34.1, 648.5, 955.7))
    js = tmp_path / "gnd.json"
    ground_truth_to_json(gt, js)
    from_json = load_ground_truth(js)
    assert from_json == gt
    # A JSON file written by hand, in the documented form, reads the same.
    hand = tmp_path / "hand.json"
    hand.write_text(
        json.dumps(
            {
                "imlist": gt.imlist,
                "qimlist": gt.qimlist,
                "gnd": [
                    {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": [0, 1], "hard": [], "junk": [2]},
                    {"bbx": [1, 2, 30, 40], "easy": [3], "hard": [2, 1], "junk": []},
                ],
            }
        )
    )
    assert load_ground_truth(hand) == gt


def test_ground_truth_validation(tmp_path):
    bad = _gnd_content()
    bad["gnd"][1]["easy"] = [7]  # outside the 4 database images
    p = tmp_path / "bad.pkl"
    p.write_bytes(pickle.dumps(bad))
    with pytest.raises(EvaluationError, match=r"gnd\[1\]\.easy: index 7 is outside the 4 database images"):
        load_ground_truth(p)
    p.write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(EvaluationError, match="imlist, qimlist and gnd"):
        load_ground_truth(p)
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(EvaluationError, match="not a readable pickle"):
        load_ground_truth(p)
    with pytest.raises(EvaluationError, match="not found"):
        load_ground_truth(tmp_path / "missing.pkl")
    j = tmp_path / "bad.json"
    j.write_text("{not json")
    with pytest.raises(EvaluationError, match="not valid JSON"):
        load_ground_truth(j)


def test_ground_truth_dataclass_roundtrip():
    gt = GroundTruth(["a"], ["q"], [{"bbx": None, "easy": [0], "hard": [], "junk": []}])
    assert gt.to_dict()["gnd"][0] == {"bbx": None, "easy": [0], "hard": [], "junk": []}
