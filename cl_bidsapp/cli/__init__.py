"""cl_bidsapp.cli"""
