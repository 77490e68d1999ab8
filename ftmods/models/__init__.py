"""Model loading (hub id or local path) and tiny offline builders."""
