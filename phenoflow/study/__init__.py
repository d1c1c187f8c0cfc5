"""Design-space studies: a base configuration plus named variants, trained and scored with one protocol
(docs/study.md). spec: the spec format; builtin: the paper's studies; runner: units, resume, parallel
processes; report / findings: the tables and the paper's findings."""
