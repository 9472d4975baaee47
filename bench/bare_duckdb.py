"""Baseline (a): the bare DuckDB aggregation + join of actual vs reported an engineer would write."""

import sys

import duckdb

folder = sys.argv[1]
con = duckdb.connect()
rows = con.execute(f"""
    WITH a AS (SELECT account_id, product_key, date_trunc('month', ts) AS month, sum(units) AS units
               FROM read_parquet('{folder}/actual_usage.parquet') GROUP BY ALL),
         r AS (SELECT account_id, product_key, date_trunc('month', ts) AS month, sum(units) AS units
               FROM read_parquet('{folder}/reported_usage.parquet') GROUP BY ALL)
    SELECT account_id, product_key, month, a.units AS actual, r.units AS reported
    FROM a FULL OUTER JOIN r USING (account_id, product_key, month)
    WHERE coalesce(a.units, 0) <> coalesce(r.units, 0)""").fetchall()
print(f"{len(rows)} gaps")
