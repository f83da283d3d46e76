"""SoundNet: sound representations distilled from vision networks on unlabeled video.

The stage folders of the repository are the subpackages of this one import root: ``soundnet.ingest``,
``soundnet.teachers``, ``soundnet.shards``, ``soundnet.student``, ``soundnet.evaluate``.
"""
