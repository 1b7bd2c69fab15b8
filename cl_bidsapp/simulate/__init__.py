"""cl_bidsapp.simulate"""
