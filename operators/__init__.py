"""The kopf operator that turns CompressionJob resources into Ray jobs (issue: operator)."""
