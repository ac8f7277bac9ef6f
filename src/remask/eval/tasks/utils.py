"""Datasets of remask's local lm-eval tasks (read by the YAMLs beside this file through
`custom_dataset: !function utils.NAME`): built from the data remask ships, nothing downloaded."""

import datasets

from remask.eval import task_data


def _test(rows: list[dict], **_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def capitals(**kwargs):
    return _test(task_data.capital_choice_items(), **kwargs)


def poem_next_line(**kwargs):
    return _test(task_data.poem_next_line_items(), **kwargs)


def tang300_held_out(**kwargs):
    return _test(task_data.tang300_held_out(), **kwargs)
