"""The paper's numbers this project compares to, in one place (docs/paper_numbers.md says where
each comes from). Llama-2-7b-chat family, AdvBench + GPT-4o evaluation set (n = 520)."""

PAPER_SVD = {"base": (49.43, 4.76), "AT": (43.76, 4.79), "LAT": (54.0, 20.0)}  # % comp1, comp2 at layer 14
AUTHORS_FROBENIUS = {"base": 376.11, "AT": 353.06, "LAT": 521.06}  # ||D||_F printed in the authors' notebook
AUTHORS_FROBENIUS_PAIRS = 416  # ... over their run "n_samples_416.layer_14": 416 pairs at layer 14 (unreleased)

PAPER_TABLE1 = {  # refusal % after ablation at layer 14, n = 520; (target, source)
    ("base", "base"): 20.38, ("base", "LAT"): 10.77, ("AT", "base"): 24.04, ("AT", "LAT"): 13.65,
    ("AT", "AT"): 38.08, ("LAT", "base"): 25.77, ("LAT", "LAT"): 16.92}

PAPER_SWEEP_BEST = {"base": 14, "AT": 10, "LAT": 14}  # lowest refusal with < 5 % invalid

PAPER_SWEEP_REFUSAL = {  # % refusal with each layer's own direction ablated, n = 520, layers 1..20
    "base": [99.81, 98.46, 99.81, 99.42, 99.04, 99.23, 98.46, 90.38, 75.77, 47.5, 63.27, 58.08, 57.5, 20.38,
             72.88, 88.85, 91.54, 93.85, 94.62, 94.04],
    "AT": [99.62, 99.23, 99.62, 99.62, 98.65, 98.85, 96.92, 80.58, 49.23, 37.69, 66.15, 61.54, 62.31, 38.08,
           77.31, 93.85, 95.58, 97.31, 97.88, 96.73],
    "LAT": [99.81, 0.0, 0.0, 6.92, 100.0, 99.81, 99.81, 99.42, 97.88, 60.77, 59.23, 39.42, 66.73, 16.92,
            72.69, 85.58, 83.85, 89.62, 91.15, 91.15],
}
