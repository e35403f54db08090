"""Evaluation: named eval sets, guard metrics, the student/teacher/paper report, augmentation diversity."""
