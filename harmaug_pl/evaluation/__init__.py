"""Evaluation: named eval sets, guard metrics, the report that compares student, teacher and paper."""
