//! `torch_file::save` against the real `torch.load(weights_only=True)`:
//! an AdamW-shaped state dict (int keys, nested dicts, lists, floats, bools,
//! None, tuples, f32 tensors of several shapes, a large int) and a byte tensor
//! (what `rng_state.pth` holds) load back with the same values.

mod common;

use common::*;
use companion::torch_file::{save, PyValue, TorchTensor};
use serde_json::json;

fn s(x: &str) -> PyValue {
    PyValue::Str(x.into())
}

#[test]
fn torch_loads_what_we_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.pt");
    let state = PyValue::Dict(vec![
        (
            s("state"),
            PyValue::Dict(vec![(
                PyValue::Int(0),
                PyValue::Dict(vec![
                    (s("step"), PyValue::Tensor(TorchTensor::f32(vec![], &[3.0]))),
                    (
                        s("exp_avg"),
                        PyValue::Tensor(TorchTensor::f32(
                            vec![2, 3],
                            &[1.0, -2.0, 3.5, 0.0, 1e-8, 7.0],
                        )),
                    ),
                    (
                        s("exp_avg_sq"),
                        PyValue::Tensor(TorchTensor::f32(vec![4], &[0.5; 4])),
                    ),
                ]),
            )]),
        ),
        (
            s("param_groups"),
            PyValue::List(vec![PyValue::Dict(vec![
                (s("lr"), PyValue::Float(0.002)),
                (
                    s("betas"),
                    PyValue::Tuple(vec![PyValue::Float(0.9), PyValue::Float(0.999)]),
                ),
                (s("weight_decay"), PyValue::Float(0.1)),
                (s("amsgrad"), PyValue::Bool(false)),
                (s("foreach"), PyValue::None),
                (
                    s("params"),
                    PyValue::List(vec![PyValue::Int(0), PyValue::Int(1 << 40)]),
                ),
            ])]),
        ),
        (s("rng"), PyValue::Tensor(TorchTensor::u8(&[0, 1, 255]))),
        (s("empty"), PyValue::Tuple(vec![])),
    ]);
    save(&state, &path).unwrap();
    let got = run_python("torch_load.py", &[path.to_str().unwrap()]);
    let t = |dtype: &str, shape: serde_json::Value, values: serde_json::Value| json!({"dtype": dtype, "shape": shape, "values": values, "contiguous": true});
    let want = json!({
        "str:state": {"int:0": {
            "str:step": t("torch.float32", json!([]), json!([3.0])),
            "str:exp_avg": t("torch.float32", json!([2, 3]), json!([1.0, -2.0, 3.5, 0.0, 1e-8f32 as f64, 7.0])),
            "str:exp_avg_sq": t("torch.float32", json!([4]), json!([0.5, 0.5, 0.5, 0.5])),
        }},
        "str:param_groups": [{
            "str:lr": 0.002, "str:betas": {"tuple": [0.9, 0.999]}, "str:weight_decay": 0.1,
            "str:amsgrad": false, "str:foreach": null, "str:params": [0, 1u64 << 40],
        }],
        "str:rng": t("torch.uint8", json!([3]), json!([0, 1, 255])),
        "str:empty": {"tuple": []},
    });
    assert_eq!(got, want);
}
