"""cl_bidsapp.core"""
