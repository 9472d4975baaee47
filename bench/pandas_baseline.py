"""Baseline (b): the pandas read + groupby + merge an analyst would write."""

import sys

import pandas as pd

folder = sys.argv[1]
frames = {}
for side in ("actual", "reported"):
    df = pd.read_parquet(f"{folder}/{side}_usage.parquet", columns=["account_id", "product_key", "ts", "units"])
    df["month"] = df["ts"].dt.tz_convert("UTC").dt.to_period("M")
    frames[side] = df.groupby(["account_id", "product_key", "month"], as_index=False)["units"].sum()
merged = frames["actual"].merge(frames["reported"], on=["account_id", "product_key", "month"], how="outer",
                                suffixes=("_actual", "_reported")).fillna(0)
print(f"{(merged['units_actual'] != merged['units_reported']).sum()} gaps")
