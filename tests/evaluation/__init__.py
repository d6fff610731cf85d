"""Tests of dbconvert eval (FID through clean-fid, MAUVE through mauve-text)."""
