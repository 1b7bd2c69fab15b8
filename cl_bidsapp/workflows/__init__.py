"""cl_bidsapp.workflows"""
