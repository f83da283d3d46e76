"""Vision teachers: architecture registry, weights, preprocessing, class names, batched log-probabilities."""

from soundnet.teachers.preprocess import Preprocessing
from soundnet.teachers.registry import ARCHS, ArchEntry, class_names, known_archs, register_arch
from soundnet.teachers.teacher import Teacher, TeacherSpec, load_teacher, parse_spec, parse_specs

__all__ = [
    "ARCHS",
    "ArchEntry",
    "Preprocessing",
    "Teacher",
    "TeacherSpec",
    "class_names",
    "known_archs",
    "load_teacher",
    "parse_spec",
    "parse_specs",
    "register_arch",
]
