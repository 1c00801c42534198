"""`make bench`: flowgate measured against its physical limits and its peers (see __main__)."""
